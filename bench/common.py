"""The bench's team, its data and its runs: shared by every mode (python -m bench --help)."""
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import distill
import glue_data
import model
import teachers


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cache fill, --speed
# name: (layers, seed, what it learns from). Capacities differ, and two teachers are bad on purpose:
#   "shuffled"  trained on train with its labels permuted: no signal, it predicts the majority
#               class;
#   "contra"    not trained: L6-s1 with its output rows rolled by one class, so that it contradicts
#               every prediction L6-s1 makes (distilled alone, it teaches the student the wrong
#               answers).
# Listed longest first, so that with --jobs the last runs are short ones.
TEAM = {"L6-s1": (6, 1, "labels"), "L6-s2": (6, 2, "labels"), "L6-shuffled": (6, 5, "shuffled"),
        "L6-contra": (6, 1, "contra"), "L4": (4, 3, "labels"), "L3": (3, 4, "labels")}
HARMFUL = "contra"
INEFFECTIVE = "shuffled"


def rewrite_train(src_dir, dst_dir, task, limit, shuffle, seed):
    """A copy of the task's files with train subsampled to `limit` rows and/or its labels
    shuffled."""
    spec = glue_data.get_task(task)
    os.makedirs(os.path.join(dst_dir, task), exist_ok=True)
    for split in ("train",) + spec.dev:
        src = os.path.join(src_dir, task, split + ".tsv")
        with open(src, encoding="utf-8-sig", newline="") as f:
            lines = [l for l in f.read().split("\n") if l]
        head, rows = (lines[:1], lines[1:]) if spec.header else ([], lines)
        if split == "train":
            rng = random.Random(seed)
            if limit:
                rows = rng.sample(rows, min(limit, len(rows)))
            if shuffle:  # permute the label column: same label balance, no signal
                col = head[0].split("\t").index(spec.label) if spec.header else spec.label
                cells = [r.split("\t") for r in rows]
                labels = [c[col] for c in cells]
                rng.shuffle(labels)
                rows = ["\t".join(c[:col] + [l] + c[col + 1:]) for c, l in zip(cells, labels)]
        text = "".join(line + "\n" for line in head + rows)
        write_text(os.path.join(dst_dir, task, split + ".tsv"), text)


def write_transfer(src_dir, path, task, limit, n):
    """A transfer set: n training examples outside the `limit` that rewrite_train keeps (without a
    limit, n of all), in the task's test-file format, labels dropped."""
    examples = glue_data.read_split(os.path.join(src_dir, task, "train.tsv"), task)
    kept = set()
    if limit:  # the very draw of rewrite_train
        kept = set(random.Random(0).sample(range(len(examples)), min(limit, len(examples))))
    rest = [i for i in range(len(examples)) if i not in kept]
    chosen = random.Random(1).sample(rest, min(n, len(rest)))
    _, field_a, field_b, _, _ = glue_data.HUB_TASKS[task]
    records = [{"idx": j, field_a: examples.text_a[i], "label": -1} |
               ({field_b: examples.text_b[i]} if field_b else {}) for j, i in enumerate(chosen)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = glue_data.hub_to_tsv(task, "test", records, None)
    write_text(path, "".join(line + "\n" for line in lines))


def portable(text):
    """text with the home folder written as ~, so that results name no one's machine."""
    return text.replace(os.path.expanduser("~") + os.sep, "~" + os.sep)


def write_text(path, text):
    glue_data.write_atomic(path, lambda f: f.write(text))


AUTO_FLAGS = ("phase1_epochs", "phase2_epochs", "heldout", "reward", "reward_reach", "probe_every",
              "probe_size", "lookahead_share", "keep")  # read only by --strategy auto, to learn p


def run_distill(argv):
    """Run distill.main on argv unless its metrics.json exists (its output goes to run.log), and
    return metrics.json. A run killed midway goes on from its resume.pt."""
    resume = os.path.isfile(os.path.join(distill.parse_args(argv).out_dir, "resume.pt"))
    args = distill.parse_args(argv + ["--resume"] * resume)
    path = os.path.join(args.out_dir, "metrics.json")
    if not os.path.isfile(path):
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "run.log"), "a") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            distill.main(args)
    with open(path) as f:
        metrics = json.load(f)
    wanted = json.loads(json.dumps(vars(args)))  # (as metrics.json holds them: tuples as lists)
    had = metrics["args"]
    for flags in (wanted, had):
        flags["teachers"] = sorted(flags.get("teachers") or [])  # the order named decides nothing
    # a run moved or linked to another folder is still the same run
    same_run = distill.FREE_FLAGS + ("out_dir",)
    if wanted["strategy"] != "auto":
        same_run += AUTO_FLAGS  # flags no other strategy reads
    other = distill.differing_flags(wanted, had, same_run)
    if other:
        raise ValueError(f"{args.out_dir} holds a run made with other flags "
                         f"(--{', --'.join(other)}): bench into another --out, or delete it")
    return metrics


def run_all(jobs, argvs, t0, run_one=run_distill):
    """Run every argv ({key: argv}) with run_one, `jobs` at a time; {key: metrics.json}."""
    def done(key, m, i):
        minutes = (time.time() - t0) / 60
        score = glue_data.score(m["dev"])
        print(f"[{i}/{len(argvs)}, {minutes:.0f} min] {key}: dev score {score:.4f}", flush=True)
    if jobs == 1:
        out = {}
        for i, (key, argv) in enumerate(argvs.items(), 1):
            out[key] = run_one(argv)
            done(key, out[key], i)
        return out
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {key: pool.submit(run_one, argv) for key, argv in argvs.items()}
        for i, (key, f) in enumerate(futures.items(), 1):
            done(key, f.result(), i)
        return {key: f.result() for key, f in futures.items()}


def run_argv(a, work, data_dir, strategy, name, teacher_dirs, seed):
    """distill.py's flags for one run of the bench: every run has the same student and budget. An
    auto run at a --lookahead_share given to the bench has its own folder."""
    if strategy == "auto":
        name += share_tag(a)
    argv = ["--task", a.task, "--max_seq_len", str(a.max_seq_len),
            "--cache_dir", os.path.join(work, "cache"), "--data_dir", data_dir,
            "--strategy", strategy, "--student", a.base_model,
            "--student_layers", str(a.student_layers), "--epochs", str(a.epochs), "--lr", str(a.lr),
            "--seed", str(seed), "--out_dir", os.path.join(work, name)] + share_flag(a)
    if teacher_dirs and a.transfer:
        argv += ["--transfer", os.path.join(work, "transfer", a.task + ".tsv")]
    return argv + (["--teachers"] + teacher_dirs if teacher_dirs else [])


def share_flag(a):
    """The bench's --lookahead_share for a student's run (none given: distill.py's default)."""
    return [] if a.lookahead_share is None else ["--lookahead_share", str(a.lookahead_share)]


def share_tag(a):
    """What names an auto run's folder and --selection's files at a --lookahead_share given to the
    bench ("" at distill.py's default)."""
    return "" if a.lookahead_share is None else f"-share{a.lookahead_share}"


def team_members(a):
    """The bench's team, {name: (layers, seed, kind)}: TEAM, after the base-size teacher (all its
    layers, first: the longest to fine-tune) when --base_teacher names one."""
    if a.base_teacher:
        return {"base": (None, 1, "labels")} | TEAM
    return dict(TEAM)


def make_team(a, members, t0):
    """Fine-tune the team with distill.py --strategy none (reused when present), build the
    contradicting teacher and cache every teacher's outputs once, so that parallel runs only read
    the cache.

    Returns (work folder, data folder, teacher folders, {name: metrics.json of its training},
    {name: dev score}, {name: teacher_fit}).
    """
    work = os.path.join(a.out, a.task)
    data_dir = a.data_dir
    if a.train_limit:
        data_dir = os.path.join(work, "data")
        rewrite_train(a.data_dir, data_dir, a.task, a.train_limit, False, 0)
    if a.transfer:
        transfer = os.path.join(work, "transfer", a.task + ".tsv")
        write_transfer(a.data_dir, transfer, a.task, a.train_limit, a.transfer)
    argvs = {}
    for name, (layers, seed, kind) in members.items():
        teacher_data = data_dir
        if kind == INEFFECTIVE:
            teacher_data = os.path.join(work, "shuffled")
            rewrite_train(data_dir, teacher_data, a.task, None, True, seed)
        if kind != HARMFUL:  # (built from L6-s1 below, not trained)
            out = os.path.join(work, "teachers", name)
            argvs[name] = teacher_argv(a, layers, seed, teacher_data, out)
    team = run_all(a.jobs, argvs, t0)
    dirs = [os.path.join(work, "teachers", n) for n in members]
    for name, d in zip(members, dirs):
        if members[name][2] == HARMFUL:
            contradict(os.path.join(work, "teachers", "L6-s1"), d, a.task)
    data = glue_data.load_task(data_dir, a.task)
    cache = os.path.join(work, "cache")
    loaded = teachers.load_team(dirs, a.task, data, a.max_seq_len, cache, DEVICE)
    if a.transfer:  # the outputs on the transfer set too, once, before parallel runs need them
        data["transfer"] = glue_data.read_split(transfer, a.task, labelled=False)
        teachers.load_team(dirs, a.task, data, a.max_seq_len, cache, DEVICE)
    scores = {n: glue_data.score(t.dev_metrics) for n, t in zip(members, loaded)}
    T = distill.parse_args(["--task", a.task]).temperature  # distill.py's, which the runs keep
    labels = data["train"].labels
    fit = {n: teacher_fit(t.train, labels, T) for n, t in zip(members, loaded)}
    return work, data_dir, dirs, team, scores, fit


def teacher_fit(logits, labels, T):
    """How a teacher fits the labelled training examples, the pool the reward's held-out batches
    come from: its accuracy, and the mean probability its soft targets at temperature T give the
    right label (what a distillation step pulls the student toward). None for regression.
    logits [N, C], labels [N]."""
    if logits.shape[-1] == 1:
        return None
    y = torch.tensor(labels)  # [N]
    right = model.soft_targets(logits, T)[torch.arange(len(y)), y]  # [N]
    accuracy = glue_data.accuracy(logits.argmax(-1).tolist(), labels)
    return {"accuracy": accuracy, "right_label_p": float(right.mean())}


def teacher_argv(a, layers, seed, data_dir, out):
    """distill.py's flags to fine-tune one teacher: `layers` of --base_model, or all of
    --base_teacher (layers None)."""
    argv = ["--task", a.task, "--max_seq_len", str(a.max_seq_len), "--strategy", "none",
            "--data_dir", data_dir]
    if layers is None:  # the base-size teacher, all its layers
        argv += ["--student", a.base_teacher, "--epochs", str(a.base_teacher_epochs),
                 "--lr", str(a.base_teacher_lr)]
    else:
        argv += ["--student", a.base_model, "--student_layers", str(layers),
                 "--epochs", str(a.teacher_epochs), "--lr", str(a.teacher_lr)]
    return argv + ["--seed", str(seed), "--out_dir", out]


def contradict(src, dst, task):
    """A copy of the classifier in src that contradicts it: output i is src's output i+1 (two
    classes: swapped), so it puts its confidence on a wrong class wherever src is right;
    regression: 5 - score."""
    if os.path.isfile(os.path.join(dst, "config.json")):
        return
    net = AutoModelForSequenceClassification.from_pretrained(src)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)
            and m.out_features == net.config.num_labels][-1]  # the layer that gives the outputs
    with torch.no_grad():
        if glue_data.get_task(task).labels is None:
            head.weight.neg_()
            head.bias.neg_().add_(5.0)
        else:
            head.weight.copy_(head.weight.roll(-1, 0))
            head.bias.copy_(head.bias.roll(-1, 0))
    shutil.rmtree(dst + ".tmp", ignore_errors=True)
    net.save_pretrained(dst + ".tmp")
    AutoTokenizer.from_pretrained(src).save_pretrained(dst + ".tmp")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(dst + ".tmp", dst)
