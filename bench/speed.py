"""python -m bench --speed: what distillation costs next to plain fine-tuning of the same student on
the same batches."""
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import AutoTokenizer

import distill
import glue_data
import model
import teachers
from bench.common import DEVICE, portable, rewrite_train, run_distill, write_text, write_transfer


def measured(argv):
    """distill.main afresh in this process (one thread): (metrics.json, peak memory in MiB)."""
    torch.set_num_threads(1)
    shutil.rmtree(distill.parse_args(argv).out_dir, ignore_errors=True)
    cpu = time.process_time()
    metrics = run_distill(argv)
    metrics["timings"]["cpu_s"] = time.process_time() - cpu  # the whole run, in CPU time
    if DEVICE.type == "cuda":
        return metrics, torch.cuda.max_memory_allocated() / 2 ** 20
    return metrics, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def in_fresh_process(argv):
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, spawn, max_tasks_per_child=1) as pool:
        return pool.submit(measured, argv).result()


def padding(lengths, batch_size, generator=None):
    """Padded tokens / real tokens of glue_data.batches over these lengths."""
    lengths = torch.as_tensor(lengths)
    # group=1: no sorting by length
    order = glue_data.batches(lengths, batch_size, generator, group=1)
    return sum(len(b) * int(lengths[b].max()) for b in order) / int(lengths.sum())


FINE_TUNES = ("fine-tune", "fine-tune again")  # --speed's plain fine-tuning, first and last run


def speed(a):
    """Step times, whole runs and memory of every kind of run, side by side on one machine."""
    t0 = time.time()
    work = os.path.join(a.out, "speed")
    data_dir = os.path.join(work, "data")
    limit = a.train_limit or 2000
    rewrite_train(a.data_dir, data_dir, a.task, limit, False, 0)
    # as many unlabelled examples again, for a final step on mixed batches (the soft loss alone)
    transfer = os.path.join(work, "transfer", a.task + ".tsv")
    write_transfer(a.data_dir, transfer, a.task, limit, limit)
    data = glue_data.load_task(data_dir, a.task)
    dirs = speed_team(a, work)
    torch.set_num_threads(1)
    cache = os.path.join(work, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    t = time.time()
    teachers.load_team(dirs, a.task, data, a.max_seq_len, cache, DEVICE)
    fill_s = time.time() - t
    common = ["--task", a.task, "--data_dir", data_dir, "--student", a.base_model,
              "--student_layers", str(a.student_layers), "--epochs", str(a.epochs),
              "--lr", str(a.lr), "--cache_dir", cache, "--seed", "0"]
    runs = {  # name: argv; plain fine-tuning twice, first and last, to see the machine's drift
        "fine-tune": ["--strategy", "none"],
        "single": ["--strategy", "single", "--teachers", dirs[0]],
        "uniform, 2 teachers": ["--strategy", "uniform", "--teachers"] + dirs[:2],
        "uniform, 8 teachers": ["--strategy", "uniform", "--teachers"] + dirs,
        "single, transfer set": ["--strategy", "single", "--transfer", transfer,
                                 "--teachers", dirs[0]],
        "auto, 8 teachers": ["--strategy", "auto", "--teachers"] + dirs,  # the default flags
        "auto, 8 teachers, whole student": ["--strategy", "auto", "--reward_reach", "student",
                                            "--teachers"] + dirs,
        "auto, 8 teachers, whole student, share 0.25":
            ["--strategy", "auto", "--reward_reach", "student", "--lookahead_share", "0.25",
             "--teachers"] + dirs,
        "auto, 8 teachers, step reward": ["--strategy", "auto", "--reward", "step",
                                          "--teachers"] + dirs,
        "fine-tune again": ["--strategy", "none"]}
    out = {}
    for name, extra in runs.items():
        folder = os.path.join(work, "runs", name.replace(", ", "-").replace(" ", "-"))
        out[name] = speed_run(common + extra + ["--out_dir", folder])
        out[name]["default"] = extra[:3] == ["--strategy", "auto", "--teachers"]  # nothing else
        shown = ", ".join(f"{k} {v:.4g}" for k, v in out[name].items() if k != "default")
        print(f"[{(time.time() - t0) / 60:.0f} min] {name}: {shown}", flush=True)
    forward = no_grad_forward_s(a, data, dirs[0])
    speed_report(a, data, dirs, out, fill_s, forward)
    print(f"bench --speed: {(time.time() - t0) / 60:.1f} min")


def no_grad_forward_s(a, data, tokenizer_from):
    """The mean time of one forward of the student without gradients and without dropout over
    train's batches (one thread, CPU time on CPU): what the output-layer reward would add to a
    phase-1 step if it read its features from a pass of its own rather than from the step's."""
    labels = glue_data.get_task(a.task).labels
    student = model.build_student(a.base_model, labels, a.student_layers, a.task)[0]
    student = student.to(DEVICE).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    enc = glue_data.encode(tokenizer, data["train"], a.max_seq_len)
    order = glue_data.batches(torch.tensor(glue_data.lengths(enc)), 32,
                              torch.Generator().manual_seed(0))
    clock = time.process_time if DEVICE.type == "cpu" else time.perf_counter
    t = clock()
    on_gpu = DEVICE.type == "cuda"  # (as the training step: bf16 autocast on GPU)
    with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16, enabled=on_gpu):
        for b in order:
            batch = glue_data.collate(tokenizer, enc, b)
            student(**{k: v.to(DEVICE) for k, v in batch.items()}).logits.float().sum().item()
    return (clock() - t) / len(order)


def speed_team(a, work):
    """8 teachers of 4 sizes from --base_model (their quality does not matter for speed, so they
    are not fine-tuned); their folders."""
    labels = glue_data.get_task(a.task).labels
    have = model.layers_to_keep(a.base_model)
    dirs = [os.path.join(work, "teachers", f"T{i}") for i in range(8)]
    for i, d in enumerate(dirs):
        if os.path.isfile(os.path.join(d, "config.json")):
            continue
        torch.manual_seed(i)
        layers = min(have, [6, 4, 3, 2][i % 4])
        net, tok = model.build_student(a.base_model, labels, layers, a.task)
        net.save_pretrained(d)
        tok.save_pretrained(d)
    return dirs


def speed_run(argv):
    """One run in a fresh process: its peak memory, whole-run time and step time per phase."""
    m, peak = in_fresh_process(argv)
    T = m["timings"]
    run_s = T["cpu_s"] if DEVICE.type == "cpu" else T["total_s"] - T["teachers_s"]
    table_s = T.get("table_s", 0)  # the closing table (teachers reloaded and timed), counted apart
    out = {"peak_mib": peak, "run_s": run_s - table_s, "table_s": table_s}
    for p in distill.PHASES:
        if f"{p}_steps" in T:
            out[f"{p}_step_s"] = T[f"{p}_steps_s"] / T[f"{p}_steps"]
    return out


def speed_ratios(out, ft):
    """{ratio: (measured, target)}: each kind of step and run against plain fine-tuning (ft: its
    step time, the mean of its two runs), and peak memory with 8 teachers against 2."""
    ft_run = statistics.mean(out[n]["run_s"] for n in FINE_TUNES)
    auto = out["auto, 8 teachers"]
    whole = out["auto, 8 teachers, whole student"]
    share = out["auto, 8 teachers, whole student, share 0.25"]
    step = out["auto, 8 teachers, step reward"]
    final = lambda name: out[name]["final_step_s"] / ft
    peak = lambda name: out[name]["peak_mib"]
    ratios = {  # (measured, target)
        "final distillation step / fine-tuning step (single)": (final("single"), 1.05),
        "final distillation step / fine-tuning step (uniform, 8)":
            (final("uniform, 8 teachers"), 1.05),
        "final distillation step / fine-tuning step (single, transfer set)":
            (final("single, transfer set"), 1.05),
        "phase-1 step, lookahead through the output layer (default) / fine-tuning step":
            (auto["phase1_step_s"] / ft, 1.15),
        "phase-2 step, lookahead through the output layer (default) / fine-tuning step":
            (auto["phase2_step_s"] / ft, 1.15),
        "phase-1 step, lookahead through the whole student / fine-tuning step":
            (whole["phase1_step_s"] / ft, 2.0),
        "phase-1 step, whole student, a quarter of the batch / fine-tuning step":
            (share["phase1_step_s"] / ft, 1.5),
        "phase-1 step, step reward / fine-tuning step": (step["phase1_step_s"] / ft, 1.5),
        "whole auto run (default) / whole fine-tuning run": (auto["run_s"] / ft_run, 1.7),
        "whole auto run, whole student / whole fine-tuning run": (whole["run_s"] / ft_run, 2.5),
        "whole auto run, whole student, a quarter of the batch / whole fine-tuning run":
            (share["run_s"] / ft_run, 1.9),
        "peak memory, 8 teachers / 2 teachers":
            (peak("uniform, 8 teachers") / peak("uniform, 2 teachers"), 1.1)}
    return ratios


def speed_report(a, data, dirs, out, fill_s, forward_s):
    """results/speed-<device>.json and .md: every ratio against its target, every run."""
    ft = statistics.mean(out[n]["final_step_s"] for n in FINE_TUNES)
    ratios = speed_ratios(out, ft)
    if DEVICE.type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{cpu_name()}, 1 thread of {os.cpu_count()} CPUs"
    tokenizer = AutoTokenizer.from_pretrained(dirs[0])
    enc_len = glue_data.lengths(glue_data.encode(tokenizer, data["train"], a.max_seq_len))
    shuffled = torch.Generator().manual_seed(0)
    result = {"device": device, "platform": platform.platform(), "torch": torch.__version__,
              "task": a.task, "train_examples": len(data["train"]), "epochs": a.epochs,
              "student_layers": a.student_layers, "runs": out,
              "ratios": {k: v[0] for k, v in ratios.items()}, "fine_tune_step_s": ft,
              "cache_fill_s": fill_s, "no_grad_forward_s": forward_s,
              "cache_fill_examples": 8 * sum(len(ex) for ex in data.values()),
              "padding_sorted": padding(enc_len, 64),
              "padding_unsorted": padding(enc_len, 64, shuffled)}
    clock = "the process's CPU time." if DEVICE.type == "cpu" else "wall time."
    lines = [f"Measured on {device} ({result['platform']}, torch {torch.__version__}); {a.task}, "
             f"{result['train_examples']} training examples, {a.student_layers}-layer student of "
             f"{a.base_model}, {a.epochs} epochs, batch 32; times are " + clock,
             "", "| ratio | measured | target |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f}x | <= {target}x |" for k, (v, target) in ratios.items()]
    lines += ["", "| run | peak memory (MiB) | whole run (s) | "
              "step (ms): phase-1, phase-2, final | "
              "closing table (s) |", "|---|---|---|---|---|"]
    for n, r in out.items():
        steps = [f"{1000 * r[p + '_step_s']:.1f}" if p + "_step_s" in r else "-"
                 for p in distill.PHASES]
        n += " (default)" if r["default"] else ""
        lines.append(f"| {n} | {r['peak_mib']:.0f} | {r['run_s']:.1f} | {', '.join(steps)} | "
                     f"{r['table_s']:.1f} |")
    lines += ["", "Whole run: the process's time, less the closing table's (every teacher loaded "
              "again and timed, and the student, on the same dev examples), shown apart."]
    lines += ["", f"A forward of the student without gradients or dropout on a training batch "
              f"(what the output-layer reward would add to a phase-1 step with features of a pass "
              f"of its own): {1000 * forward_s:.1f} ms, {forward_s / ft:.2f}x a fine-tuning step."]
    n_fill = result["cache_fill_examples"]
    lines += ["", f"Cache fill: 8 teachers over train and dev once, {n_fill} examples in "
              f"{fill_s:.1f} s ({n_fill / fill_s:.0f} examples/s), in inference mode, batches "
              f"of 64 sorted by length: {100 * (result['padding_sorted'] - 1):.1f}% padding "
              f"tokens, "
              f"against {100 * (result['padding_unsorted'] - 1):.1f}% in random order."]
    tag = "gpu" if DEVICE.type == "cuda" else "cpu"
    write_text(os.path.join(a.out, f"speed-{tag}.json"), portable(json.dumps(result, indent=1)))
    write_text(os.path.join(a.out, f"speed-{tag}.md"), portable("\n".join(lines) + "\n"))
    print("\n".join(lines))


def cpu_name():
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()
