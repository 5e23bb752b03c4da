"""Reproduce the paper's comparison on real GLUE data: every strategy, same team, student and budget.

    python bench.py --task MRPC --base_model <hub name or folder>

1. fine-tunes the team once (reused when present) with distill.py's own `--strategy none`:
   teachers of different capacities from --base_model, one ineffective teacher trained on shuffled
   labels, and one harmful teacher that contradicts the best-placed one (see TEAM);
2. runs none, single (once per teacher: the ground truth of what each teacher is worth to this
   student), ensemble, uniform and auto for every seed, each through distill.main (no second
   implementation); a finished run is reused (one made with other flags stops the bench);
3. writes results/<TASK>.json (every seed's figures), results/<TASK>.md (the tables: each teacher's
   dev score and fit of the training labels beside what it is worth to the student, does auto beat
   uniform and ensemble, does it discard the harmful teacher, does its p rank the teachers as the
   ground truth does, and how much teacher signal its reward carries) and
   results/<TASK>_distribution.png (AutoSKD's weights over phase-1 and phase-2, selection marked).
matplotlib is needed for the picture only (pip install matplotlib).

    python bench.py --task SST-2 --train_limit 8000 --transfer 20000 --base_teacher <folder> [--pilot]
        --base_model <hub name or folder>

distils in a low-resource setting instead: the teachers learn from 8,000 labelled sentences, and the
students also from 20,000 further ones with their labels dropped (a transfer set, written in the
test-file format), as BERT students are distilled in practice; --base_teacher adds a base-size
teacher to the team, and the rows gain SKDBERT's fixed distributions (skd teacher-rank and
student-rank) and the best teacher without the transfer set. --pilot runs `none` and `single` per
helpful teacher with a 2- and a 4-layer student first, to pick the size where they separate most.
The tables go to results/<TASK>-transfer.{json,md} and results/<TASK>-pilot.md.

    python bench.py --selection --task MRPC --base_model <hub name or folder>

runs instead AutoSKD alone, on the same team (the same runs as the full bench's auto row) and on a
team of three (two helpful teachers and the contradicting one, --keep 2, five seeds), and writes
results/<TASK>-selection.md (with --lookahead_share X: <TASK>-selection-shareX.md): each teacher's
phase-1 evidence, its p, what selection made of it, and beside it the same runs' evidence by the
lookahead through the whole student and through the output layer without dropout.

    python bench.py --speed --task MRPC --base_model <hub name or folder>

measures instead what distillation costs next to plain fine-tuning of the same student on the same
batches (step times, also on batches mixed with a transfer set, whole runs, peak memory with 2 and
8 teachers, the cache fill) and writes results/speed-<device>.json and .md. Every run is a fresh
process with one CPU thread (or one GPU).
On CPU, times are the process's CPU time: a virtual machine's host may steal a varying share of the
CPU, which wall time counts and CPU time does not. On GPU, wall time.

    python bench.py --first_run --task RTE --base_model <checkpoint with BERT's uncased vocabulary>

times what a new user waits for: `python distill.py --task RTE` in an empty folder holding the task's
files, then the same command again, each in a fresh process with torch's default threads (wall
time). Offline, the --team recipe's hub names are served from a local hub cache by checkpoints of
their exact configurations with random weights and --base_model's tokenizer (the real ones are the
same shapes, so every step costs what it costs with them). Writes results/first-run-<device>.{json,md}.
"""
import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import distill
import glue_data
import model as kd
import sampler
import teachers as team_lib

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # teachers' cache fill, --speed
# name: (layers, seed, what it learns from). Capacities differ, and two teachers are bad on purpose:
#   "shuffled"  trained on train with its labels permuted: no signal, it predicts the majority class;
#   "contra"    not trained: L6-s1 with its output rows rolled by one class, so that it contradicts
#               every prediction L6-s1 makes (distilled alone, it teaches the student the wrong answers).
# Listed longest first, so that with --jobs the last runs are short ones.
TEAM = {"L6-s1": (6, 1, "labels"), "L6-s2": (6, 2, "labels"), "L6-shuffled": (6, 5, "shuffled"),
        "L6-contra": (6, 1, "contra"), "L4": (4, 3, "labels"), "L3": (3, 4, "labels")}
HARMFUL = "contra"
INEFFECTIVE = "shuffled"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--base_model", required=True, help="pretrained checkpoint: hub name or folder")
    p.add_argument("--data_dir", default="glue_data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--teacher_epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs of every strategy's student")
    p.add_argument("--train_limit", type=int, help="subsample train to this many examples (say so)")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the students")
    p.add_argument("--teacher_lr", type=float, default=1e-4, help="learning rate of the teachers")
    p.add_argument("--transfer", type=int, default=0, help="this many further training examples, "
                   "their labels dropped, as a transfer set that every student with a teacher distils on")
    p.add_argument("--base_teacher", help="a larger pretrained checkpoint, one more teacher")
    p.add_argument("--base_teacher_lr", type=float, default=3e-5)
    p.add_argument("--base_teacher_epochs", type=int, default=2)
    p.add_argument("--pilot", action="store_true", help="single per helpful teacher with a 2- and a "
                   "4-layer student, one seed, instead of the bench (where do they separate most?)")
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                   help='an extra auto row with other distill.py flags, e.g. --variant slr1 "--sampler_lr 1"')
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one CPU thread each when > 1")
    p.add_argument("--out", default="results")
    p.add_argument("--selection", action="store_true", help="check teacher selection (see above)")
    p.add_argument("--lookahead_share", type=float, help="distill.py's, for every "
                   "student's run (default: distill.py's)")
    p.add_argument("--speed", action="store_true", help="measure speed and memory instead (see above)")
    p.add_argument("--first_run", action="store_true", help="time the default command (see above)")
    return p.parse_args(argv)


def rewrite_train(src_dir, dst_dir, task, limit, shuffle, seed):
    """A copy of the task's files with train subsampled to `limit` rows and/or its labels shuffled."""
    spec = glue_data.get_task(task)
    os.makedirs(os.path.join(dst_dir, task), exist_ok=True)
    for split in ("train",) + spec.dev:
        with open(os.path.join(src_dir, task, split + ".tsv"), encoding="utf-8-sig", newline="") as f:
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
        write_text(os.path.join(dst_dir, task, split + ".tsv"), "".join(l + "\n" for l in head + rows))


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


def run(argv):
    """distill.main on argv unless its metrics.json exists (its output goes to run.log); metrics.json.

    A run killed midway goes on from its resume.pt.
    """
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


def run_all(jobs, argvs, t0, run=run):
    """Run every argv ({key: argv}) with run, `jobs` at a time; {key: metrics.json}."""
    def done(key, m, i):
        minutes = (time.time() - t0) / 60
        score = glue_data.score(m["dev"])
        print(f"[{i}/{len(argvs)}, {minutes:.0f} min] {key}: dev score {score:.4f}", flush=True)
    if jobs == 1:
        out = {}
        for i, (key, argv) in enumerate(argvs.items(), 1):
            out[key] = run(argv)
            done(key, out[key], i)
        return out
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {key: pool.submit(run, argv) for key, argv in argvs.items()}
        for i, (key, f) in enumerate(futures.items(), 1):
            done(key, f.result(), i)
        return {key: f.result() for key, f in futures.items()}


def main(argv=None):
    a = parse_args(argv)
    t0 = time.time()
    if a.speed:
        return speed(a)
    if a.first_run:
        return first_run(a)
    members = team_members(a)
    work, data_dir, dirs, team, scores, fit = make_team(a, members, t0)
    if a.selection:
        return selection(a, members, work, data_dir, dirs, t0)
    if a.pilot:
        return pilot(a, members, work, data_dir, dirs, t0)

    # 2. every strategy and seed, same student and budget
    rows = bench_rows(a, members, dirs, scores)
    auto_first = sorted(rows.items(), key=lambda r: r[1][0] != "auto")  # the longest runs first
    argvs = {}
    for seed in a.seeds:
        for row, (strategy, prefix, teachers, extra) in auto_first:
            name = f"{prefix}-seed{seed}"
            argvs[row, seed] = run_argv(a, work, data_dir, strategy, name, teachers, seed) + extra
    done = run_all(a.jobs, argvs, t0)
    # SKDBERT's student-rank: from the `single` rows' students
    flags = student_rank_flags(a, members, dirs, done)
    rows["skd (student-rank)"] = ("skd", "skd-student-rank", dirs, flags)
    more = {}
    for seed in a.seeds:
        name = f"skd-student-rank-seed{seed}"
        argv = run_argv(a, work, data_dir, "skd", name, dirs, seed)
        more["skd (student-rank)", seed] = argv + flags
    done |= run_all(a.jobs, more, t0)
    runs = {row: {seed: done[row, seed] for seed in a.seeds} for row in rows}
    finished = list(team.values()) + list(done.values())
    run_s = sum(m["timings"]["total_s"] for m in finished)
    autos = {row: prefix for row, (strategy, prefix, _, _) in rows.items() if strategy == "auto"}
    report(a, members, work, runs, autos, scores, fit, time.time() - t0, run_s)


def bench_rows(a, members, dirs, scores):
    """The bench's rows, {row: (strategy, out_dir prefix, teachers, extra flags)}. `single` runs
    once per teacher: what each teacher is worth to this student, distilled alone, is the ranking a
    learned distribution should find."""
    rows = {"none": ("none", "none", [], [])}
    for n, d in zip(members, dirs):
        rows[f"single ({n})"] = ("single", f"single-{n}", [d], [])
    for strategy in ("ensemble", "uniform", "auto"):
        rows[strategy] = (strategy, strategy, dirs, [])
    rows["skd (teacher-rank)"] = ("skd", "skd-teacher-rank", dirs, [])
    if a.transfer:  # what the transfer set brings: the best teacher (by its dev score) without it
        best = max(members, key=lambda n: scores[n])
        best_dir = dirs[list(members).index(best)]
        no_transfer = ["--transfer", ""]  # (empty: none)
        rows[f"single ({best}, no transfer)"] = ("single", f"single-{best}-alone", [best_dir],
                                                 no_transfer)
    for name, flags in a.variant:
        rows[f"auto ({name})"] = ("auto", f"auto-{name}", dirs, shlex.split(flags))
    return rows


def student_rank_flags(a, members, dirs, done):
    """SKDBERT's student-rank p as --weights: the teachers ranked by the mean score of the students
    distilled from each alone, in the team's sorted order."""
    alone = {}  # teacher folder: that mean score
    for n, d in zip(members, dirs):
        scores = [glue_data.score(done[f"single ({n})", seed]["dev"]) for seed in a.seeds]
        alone[d] = statistics.mean(scores)
    weights = sampler.teacher_rank([alone[d] for d in sorted(dirs)])
    return ["--weights"] + [str(w) for w in weights]


def run_argv(a, work, data_dir, strategy, name, teachers, seed):
    """distill.py's flags for one run of the bench: every run has the same student and budget. An
    auto run at a --lookahead_share given to the bench has its own folder."""
    if strategy == "auto":
        name += share_tag(a)
    argv = ["--task", a.task, "--max_seq_len", str(a.max_seq_len),
            "--cache_dir", os.path.join(work, "cache"), "--data_dir", data_dir,
            "--strategy", strategy, "--student", a.base_model,
            "--student_layers", str(a.student_layers), "--epochs", str(a.epochs), "--lr", str(a.lr),
            "--seed", str(seed), "--out_dir", os.path.join(work, name)] + share_flag(a)
    if teachers and a.transfer:
        argv += ["--transfer", os.path.join(work, "transfer", a.task + ".tsv")]
    return argv + (["--teachers"] + teachers if teachers else [])


def share_flag(a):
    """bench.py's --lookahead_share for a student's run (none given: distill.py's default)."""
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
    loaded = team_lib.load_team(dirs, a.task, data, a.max_seq_len, cache, DEVICE)
    if a.transfer:  # the outputs on the transfer set too, once, before parallel runs need them
        data["transfer"] = glue_data.read_split(transfer, a.task, labelled=False)
        team_lib.load_team(dirs, a.task, data, a.max_seq_len, cache, DEVICE)
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
    right = kd.soft_targets(logits, T)[torch.arange(len(y)), y]  # [N]
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
    model = AutoModelForSequenceClassification.from_pretrained(src)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
            and m.out_features == model.config.num_labels][-1]  # the layer that gives the outputs
    with torch.no_grad():
        if glue_data.get_task(task).labels is None:
            head.weight.neg_()
            head.bias.neg_().add_(5.0)
        else:
            head.weight.copy_(head.weight.roll(-1, 0))
            head.bias.copy_(head.bias.roll(-1, 0))
    shutil.rmtree(dst + ".tmp", ignore_errors=True)
    model.save_pretrained(dst + ".tmp")
    AutoTokenizer.from_pretrained(src).save_pretrained(dst + ".tmp")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(dst + ".tmp", dst)


def report(a, members, work, runs, autos, scores, fit, seconds, run_s):
    """results/<TASK>.json and .md, and the picture of the learned distribution."""
    names = list(members)
    kinds = {kind: [n for n in names if members[n][2] == kind]
             for kind in ("labels", HARMFUL, INEFFECTIVE)}
    helpful = kinds["labels"]
    # the ground truth: the student's dev score distilled from each teacher alone, mean over seeds
    truth = {n: statistics.mean(seed_scores(runs, f"single ({n})")) for n in names}
    best = f"single ({max(helpful, key=lambda n: truth[n])})"  # the best by the ground truth
    others = ("uniform", "ensemble", "skd (teacher-rank)", "skd (student-rank)", best)
    learned = {}
    auto_dists = {}
    for row, prefix in autos.items():  # what phase-1, selection and the rewards did
        dists = read_dists(work, prefix, a.seeds)
        auto_dists[row] = dists
        learned[row] = learned_stats(dists, names, truth, kinds)
        mine = seed_scores(runs, row)
        vs = {}  # the other row: this row's score minus the other's, per seed
        for other in [r for r in others if r in runs]:
            vs[other] = [x - y for x, y in zip(mine, seed_scores(runs, other))]
        learned[row]["vs"] = vs
    spread = helpful_spread(runs, truth, helpful)
    # how well the teachers' own dev scores (skd teacher-rank's p) rank them: beside auto's tau
    score_tau = kendall_tau([truth[n] for n in names], [scores[n] for n in names])
    truth_tau = ground_truth_tau(runs, names)  # how far one seed's ground truth repeats
    result = {"task": a.task, "base_model": a.base_model, "student_layers": a.student_layers,
              "epochs": a.epochs, "train_limit": a.train_limit, "seeds": a.seeds,
              "teacher_scores": scores, "teacher_fit": fit, "ground_truth": truth,
              "teacher_score_tau": score_tau, "ground_truth_tau": truth_tau,
              "helpful_spread": spread,
              "runs": {row: {str(seed): m for seed, m in r.items()} for row, r in runs.items()},
              "learned": learned, "wall_s": seconds, "runs_total_s": run_s, "jobs": a.jobs}
    os.makedirs(a.out, exist_ok=True)
    name = a.task + ("-transfer" if a.transfer else "")  # the setting's tables, beside the others
    write_text(os.path.join(a.out, f"{name}.json"), portable(json.dumps(result, indent=1)))
    lines = strategy_table(a, runs)
    lines += teacher_table(members, runs, scores, fit, truth, spread, score_tau, truth_tau)
    lines += learned_tables(names, kinds, learned, len(a.seeds))
    lines += ["", f"This invocation: {seconds / 60:.0f} min wall time; the runs themselves took "
              f"{run_s / 60:.0f} min in all, {a.jobs} at a time (a run reused from an earlier "
              f"invocation counts its own time)."]
    write_text(os.path.join(a.out, f"{name}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(auto_dists["auto"], os.path.join(a.out, f"{name}_distribution.png"), a.task)


def read_dists(work, prefix, seeds):
    """{seed: distribution.json} of an auto row's runs."""
    dists = {}
    for seed in seeds:
        with open(os.path.join(work, f"{prefix}-seed{seed}", "distribution.json")) as f:
            dists[seed] = json.load(f)
    return dists


def seed_scores(runs, row):
    """A row's dev score, per seed."""
    return [glue_data.score(m["dev"]) for m in runs[row].values()]


def helpful_spread(runs, truth, helpful):
    """Do the helpful teachers differ in worth to the student by more than the seeds do? Their
    students' best minus worst mean score, and the seed standard deviation pooled over their rows
    (None with one seed)."""
    means = [truth[n] for n in helpful]
    spread = {"best_minus_worst": max(means) - min(means), "seed_sd": None}
    per_seed = [seed_scores(runs, f"single ({n})") for n in helpful]
    if len(per_seed[0]) > 1:
        variances = [statistics.variance(scores) for scores in per_seed]
        spread["seed_sd"] = math.sqrt(statistics.mean(variances))
    return spread


def ground_truth_tau(runs, names):
    """How far the ground truth's ranking repeats from seed to seed: per seed, Kendall's tau of the
    students distilled from each teacher alone with that seed against the mean of the other seeds'
    (empty with one seed). It says how well even the measured ranking of one seed predicts the
    others': a reference for auto's tau (a p learned with one seed), not a bound on it."""
    per_seed = [seed_scores(runs, f"single ({n})") for n in names]  # [K][S]
    n_seeds = len(per_seed[0])
    if n_seeds < 2:
        return []
    taus = []
    for s in range(n_seeds):
        this_seed = [scores[s] for scores in per_seed]
        others = [statistics.mean(scores[:s] + scores[s + 1:]) for scores in per_seed]
        taus.append(kendall_tau(this_seed, others))
    return taus


def mean_sd(values):
    """'mean ± sd' of scores in %, sd 0 for one value."""
    sd = statistics.stdev(values) if len(values) > 1 else 0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def strategy_table(a, runs):
    """The setting's line, then every row's dev metrics, mean ± sd over seeds."""
    table = {}  # row: {split/metric: [value per seed]}
    for row, by_seed in runs.items():
        dev = [m["dev"] for m in by_seed.values()]
        metrics = sorted({(split, k) for d in dev for split, ms in d.items() for k in ms})
        table[row] = {f"{split}/{k}": [d[split][k] for d in dev] for split, k in metrics}
    cols = list(next(iter(table.values())))
    setting = setting_line(a, f"a {a.student_layers}-layer student", a.seeds)
    lines = [setting + " Mean ± sd over seeds.", "", f"| strategy | {' | '.join(cols)} |",
             "|---" * (len(cols) + 1) + "|"]
    for row, r in table.items():
        lines.append(f"| {row} | {' | '.join(mean_sd(v) for v in r.values())} |")
    return lines


def teacher_table(members, runs, scores, fit, truth, spread, score_tau, truth_tau):
    """Each teacher's own dev score, its fit of the training labels, and the student distilled from
    it alone (the ground truth); score_tau: Kendall's tau of the dev scores with the ground truth;
    truth_tau: the ground truth's own, seed against the other seeds (ground_truth_tau)."""
    none = statistics.mean(seed_scores(runs, "none"))
    lines = ["", "| teacher | layers | trained on | its own dev score | its training accuracy | "
             "right label's mean probability in its soft targets (train) | student distilled "
             "from it alone | against `none` |", "|---|---|---|---|---|---|---|---|"]
    for n, (layers, _, kind) in members.items():
        alone = mean_sd(seed_scores(runs, f"single ({n})"))
        depth = "all" if layers is None else layers  # the base-size teacher keeps all its layers
        accuracy = "-"
        right = "-"
        if fit[n] is not None:
            accuracy = f"{100 * fit[n]['accuracy']:.1f}"
            right = f"{fit[n]['right_label_p']:.3f}"
        lines.append(f"| {n} | {depth} | {kind} | {100 * scores[n]:.1f} | {accuracy} | {right} | "
                     f"{alone} | {100 * (truth[n] - none):+.1f} |")
    if spread["seed_sd"] is not None:
        lines += ["", f"The helpful teachers' students: best minus worst "
                  f"{100 * spread['best_minus_worst']:.1f} points; seed standard deviation "
                  f"{100 * spread['seed_sd']:.1f} (pooled over those rows)."]
    lines += ["", f"Kendall tau of the teachers' own dev scores with the ground truth: "
              f"{score_tau:+.2f}."]
    if truth_tau:
        shown = ", ".join(f"{t:+.2f}" for t in truth_tau)
        lines += ["", f"Kendall tau of one seed's ground truth with the other seeds' mean, per "
                  f"seed: {shown} (mean {statistics.mean(truth_tau):+.2f}): how far the ranking "
                  f"itself repeats."]
    return lines


def learned_tables(names, kinds, learned, n_seeds):
    """Per auto row: against uniform and ensemble, selection and tau; p and the phase-1 rewards;
    every gap to the other rows, seed by seed."""
    harmful = ", ".join(kinds[HARMFUL])
    ineffective = ", ".join(kinds[INEFFECTIVE])
    lines = ["", f"| run | `auto` minus `uniform` (dev score, per seed: mean ± sd) | `auto` minus "
             f"`ensemble` | {harmful} discarded | {ineffective} discarded | Kendall tau with the "
             "ground truth, p after phase-1 / final p, per seed | mean tau, p after phase-1 |",
             "|---|---|---|---|---|---|---|"]
    for row, s in learned.items():
        taus = ", ".join(f"{x:+.2f} / {y:+.2f}" for x, y in zip(s["tau_phase1"], s["tau_final"]))
        mean_tau = statistics.mean(s["tau_phase1"])
        lines.append(f"| {row} | {mean_sd(s['vs']['uniform'])} | {mean_sd(s['vs']['ensemble'])} | "
                     f"{s['harmful_discarded']}/{n_seeds} | "
                     f"{s['ineffective_discarded']}/{n_seeds} | {taus} | {mean_tau:+.2f} |")
    lines += ["", f"| run | mean p after phase-1 ({', '.join(names)}) | phase-1 reward per "
              "teacher, mean ± standard error, pooled over seeds | harmful below every helpful "
              "teacher by (standard errors of the difference, least per seed) | Kendall tau of the "
              "reward ranking between seeds, mean over pairs | reward variance the teacher "
              "explains (chance) |", "|---|---|---|---|---|---|"]
    for row, s in learned.items():
        p1 = ", ".join(f"{p:.2f}" for p in s["phase1_p"])
        rewards = ", ".join(f"{m:+.2e} ± {se:.1e}" for m, se in s["reward"])
        gaps = ", ".join(f"{z:.1f}" for z in s["harmful_z"])
        share = "; ".join(f"{label} {100 * x:.1f}% ({100 * c:.1f}%)"
                          for label, (x, c) in s["share"].items())
        lines.append(f"| {row} | {p1} | {rewards} | {gaps} | {s['seed_tau']:+.2f} | {share} |")
    lines += ["", "| run | against | its dev score minus the other's, per seed | mean ± sd |",
              "|---|---|---|---|"]
    for row, s in learned.items():
        for other, gaps in s["vs"].items():
            per_seed = ", ".join(f"{100 * g:+.1f}" for g in gaps)
            lines.append(f"| {row} | {other} | {per_seed} | {mean_sd(gaps)} |")
    return lines


def setting_line(a, student, seeds):
    """What a table's runs share, said once above it."""
    labelled = f"{a.train_limit} labelled training examples" if a.train_limit else "all of train"
    transfer = f", a transfer set of {a.transfer} unlabelled ones" if a.transfer else ""
    seeds = ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
    base = f"; the base-size teacher from {portable(a.base_teacher)}" if a.base_teacher else ""
    return (f"{a.task}: {labelled}{transfer}; {student} of {portable(a.base_model)}, "
            f"{a.epochs} epochs{base}; {seeds}; dev scores (%).")


def learned_stats(dists, names, truth, kinds):
    """What an auto row's runs ({seed: distribution.json}) learned, against the ground truth."""
    truth_k = [truth[n] for n in names]
    p1 = []  # per seed: p after phase-1, in the order of names
    final = []  # per seed: the final p
    for d in dists.values():
        at = {os.path.basename(t): i for i, t in enumerate(d["teachers"])}
        p1.append([d["phase1"][-1][at[n]] for n in names])
        final.append([d["final"][at[n]] for n in names])
    rewards = [phase1_rewards(d, names) for d in dists.values()]  # per seed: ({name: [r]}, paired)
    harmful_z = []  # per seed: the harmful teacher's smallest gap below a helpful one
    for r, paired in rewards:
        gaps = [gap_z(r[h], r[x], paired) for h in kinds["labels"] for x in kinds[HARMFUL]]
        harmful_z.append(min(gaps))
    pooled = []  # per teacher: (mean, standard error) of its phase-1 rewards over every seed
    for n in names:
        r = [x for by_name, _ in rewards for x in by_name[n]]
        pooled.append((math.nan, math.nan))
        if len(r) > 1:
            pooled[-1] = (statistics.mean(r), statistics.stdev(r) / math.sqrt(len(r)))
    means = []  # per seed: each teacher's mean phase-1 reward
    for by_name, _ in rewards:
        means.append([statistics.mean(by_name[n]) if by_name[n] else math.nan for n in names])
    seed_tau = math.nan  # do the seeds rank the teachers alike?
    if len(means) > 1:
        pairs = [(s, t) for t in range(len(means)) for s in range(t)]
        seed_tau = statistics.mean(kendall_tau(means[s], means[t]) for s, t in pairs)
    discarded = [set(map(os.path.basename, d["discarded"])) for d in dists.values()]
    return {"phase1_p": [statistics.mean(p[i] for p in p1) for i in range(len(names))],
            "tau_phase1": [kendall_tau(truth_k, p) for p in p1],
            "tau_final": [kendall_tau(truth_k, p) for p in final],
            "harmful_discarded": sum(set(kinds[HARMFUL]) <= out for out in discarded),
            "ineffective_discarded": sum(set(kinds[INEFFECTIVE]) <= out for out in discarded),
            "reward": pooled, "harmful_z": harmful_z, "seed_tau": seed_tau,
            "share": teacher_share(dists)}


def phase1_rewards(d, names):
    """Each teacher's phase-1 rewards in one run: ({name: [reward]}, paired). paired: every teacher was scored
    at every step, so the lists line up step by step; otherwise each list holds the steps that drew it."""
    at = {os.path.basename(t): i for i, t in enumerate(d["teachers"])}
    logged = d.get("rewards", [])[:len(d["phase1"])]
    if logged and isinstance(logged[0][1], list):
        return {n: [r[at[n]] for _, r in logged] for n in names}, True
    return {n: [r for k, r in logged if k == at[n]] for n in names}, False


def gap_z(a, b, paired):
    """(mean(a) - mean(b)) / the standard error of that difference: of the step-by-step differences when
    paired, else of two independent means."""
    if min(len(a), len(b)) < 2:
        return math.nan
    if paired:
        d = [x - y for x, y in zip(a, b)]
        gap = statistics.mean(d)
        se = statistics.stdev(d) / math.sqrt(len(d))
    else:
        gap = statistics.mean(a) - statistics.mean(b)
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return gap / se if se > 0 else math.copysign(math.inf, gap) if gap else math.nan


def kendall_tau(x, y):
    """Kendall's tau-b of two lists of scores: (concordant - discordant pairs) / sqrt(pairs untied in x *
    pairs untied in y)."""
    pairs = [(x[i] - x[j], y[i] - y[j]) for i in range(len(x)) for j in range(i)]
    s = sum(int(d > 0) - int(d < 0) for d in (a * b for a, b in pairs))  # (numpy bools: int)
    nx = sum(a != 0 for a, _ in pairs)  # pairs untied in x
    ny = sum(b != 0 for _, b in pairs)
    return s / math.sqrt(nx * ny) if nx and ny else math.nan


def teacher_share(dists):
    """How much of the phase-1 reward the teacher explains, means over seeds, each with what chance
    alone gives: {"drawn": (share, chance)}, and for rewards that score every teacher at every step,
    "every": (share, chance).

    drawn: the drawn teacher's reward at each step, grouped by teacher: the between-teacher sum of squares
    over the total (eta squared); chance (K-1)/(n-1) for K teachers and n steps.
    every: each step's rewards minus that step's mean over the teachers (what the batch adds to all),
    then the between-teacher sum of squares over the total of what is left; chance 1/n.
    {} if rewards were not logged."""
    if not all(d.get("rewards") for d in dists.values()):
        return {}
    out = {}
    for d in dists.values():
        steps = d["rewards"][:len(d["phase1"])]
        drawn = [(k, r[k] if isinstance(r, list) else r) for k, r in steps]
        mean = statistics.mean(r for _, r in drawn)
        total = sum((r - mean) ** 2 for _, r in drawn)
        groups = {}
        for k, r in drawn:
            groups.setdefault(k, []).append(r)
        between = sum(len(g) * (statistics.mean(g) - mean) ** 2 for g in groups.values())
        share = between / total if total > 0 else 0.0
        chance = (len(d["teachers"]) - 1) / (len(drawn) - 1)
        out.setdefault("drawn", []).append((share, chance))
        if isinstance(steps[0][1], list):
            left = [[x - statistics.mean(r) for x in r] for _, r in steps]  # [n][K]
            col = [statistics.mean(c) for c in zip(*left)]
            total = sum(x * x for r in left for x in r)
            share = len(left) * sum(c * c for c in col) / total if total > 0 else 0.0
            out.setdefault("every", []).append((share, 1 / len(left)))
    return {k: tuple(statistics.mean(x) for x in zip(*v)) for k, v in out.items()}


def plot(dists, path, task):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(dists), figsize=(5 * len(dists), 3.6), squeeze=False, sharey=True)
    for ax, (seed, d) in zip(axes[0], dists.items()):
        trace = d["phase1"] + d["phase2"]
        for i, name in enumerate(d["teachers"]):
            ax.plot([p[i] for p in trace], label=os.path.basename(name))
        ax.axvline(len(d["phase1"]), color="k", ls="--", lw=1)
        ax.text(len(d["phase1"]), 0.97, " selection", va="top", transform=ax.get_xaxis_transform())
        ax.set_title(f"{task}, seed {seed}")
        ax.set_xlabel("step (phase-1, then phase-2)")
    axes[0][0].set_ylabel("sampling weight p")
    axes[0][-1].legend(fontsize=8)
    fig.savefig(path + ".tmp.png", dpi=110, bbox_inches="tight")
    os.replace(path + ".tmp.png", path)


# ------------------------------------------------------------------------------- --pilot
def pilot(a, members, work, data_dir, dirs, t0):
    """`none` and `single` for every helpful teacher, with a 2- and a 4-layer student, seed 0: where
    do the helpful teachers separate most? results/<TASK>-pilot.md."""
    helpful = [(n, d) for n, d in zip(members, dirs) if members[n][2] == "labels"]
    argvs = {}
    for layers in (2, 4):
        sized = argparse.Namespace(**(vars(a) | {"student_layers": layers}))
        prefix = f"pilot-L{layers}"
        argvs["none", layers] = run_argv(sized, work, data_dir, "none", f"{prefix}-none", [], 0)
        for n, d in helpful:
            argvs[n, layers] = run_argv(sized, work, data_dir, "single", f"{prefix}-{n}", [d], 0)
    done = run_all(a.jobs, argvs, t0)
    setting = setting_line(a, "2- and 4-layer students", [0])
    lines = [setting, "", f"| student | none | {' | '.join(n for n, _ in helpful)} | "
             "best minus worst helpful |", "|---" * (len(helpful) + 3) + "|"]
    for layers in (2, 4):
        none = glue_data.score(done["none", layers]["dev"])
        scores = [glue_data.score(done[n, layers]["dev"]) for n, _ in helpful]
        cells = " | ".join(f"{100 * s:.1f}" for s in scores)
        spread = max(scores) - min(scores)
        lines.append(f"| {layers} layers | {100 * none:.1f} | {cells} | {100 * spread:.1f} |")
    write_text(os.path.join(a.out, f"{a.task}-pilot.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------------- --selection
THREE = ("L6-s1", "L3", "L6-contra")  # two helpful teachers of different depths and the harmful one
AUDITS = ("whole_student", "output_no_dropout")  # the rewards --selection measures beside the run's


def selection(a, members, work, data_dir, dirs, t0):
    """AutoSKD on the bench's team (its auto row: same runs, reused) and on the team of three with
    --keep 2 over seeds 0-4; per run, every teacher's phase-1 evidence and what selection did."""
    at = dict(zip(members, dirs))
    argvs = {}
    for seed in a.seeds:
        argvs["team", seed] = run_argv(a, work, data_dir, "auto", f"auto-seed{seed}", dirs, seed)
    for seed in range(5):
        argvs["three", seed] = run_argv(a, work, data_dir, "auto", f"auto-three-seed{seed}",
                                        [at[n] for n in THREE], seed) + ["--keep", "2"]
    run_all(a.jobs, argvs, t0, audited_run)
    columns = " | ".join(f"{n}: reward ± se, p" for n in members)
    lines = [f"| team | seed | {columns} | harmful below every kept teacher by (standard errors) | "
             "the same, whole student | the same, output layer without dropout | "
             "harmful discarded | tau with the whole student |",
             "|---" * (len(members) + 7) + "|"]
    rows = []
    for (team, seed), argv in argvs.items():
        with open(os.path.join(distill.parse_args(argv).out_dir, "distribution.json")) as f:
            d = json.load(f)
        row = selection_row(d, members, team, seed)
        rows.append(row)
        cells = []
        for name in members:
            t = row["teachers"].get(name)
            if t is None:
                cells.append("-")
                continue
            verdict = "" if t["kept"] else " (out)"
            cells.append(f"{t['reward']:+.2e} ± {t['reward_se']:.0e}, {t['p']:.2f}{verdict}")
        gaps = " | ".join(f"{row['harmful_z_' + key]:.1f}" for key in AUDITS)
        lines.append(f"| {team} | {seed} | {' | '.join(cells)} | {row['harmful_z']:.1f} | {gaps} | "
                     f"{row['harmful_discarded']} | {row['tau_whole_student']:.2f} |")
    rule = [r for r in rows if r["harmful_z"] > 3]
    held = sum(r["harmful_discarded"] for r in rule)
    lines += ["", f"The rule: a harmful teacher whose mean phase-1 reward is more than 3 standard "
              f"errors (of the step-by-step difference) below every kept teacher's is discarded. It "
              f"applies to {len(rule)} of {len(rows)} runs, and holds in {held} of them. (out): "
              f"discarded by selection; p: after phase-1. Whole student; output layer without "
              f"dropout: the lookahead of every phase-1 step of the same runs, on the whole batch, "
              f"through every weight of the student, and through the output layer from a forward "
              f"without dropout, measured beside the run's own reward; tau: Kendall's tau between "
              f"the teachers' mean phase-1 rewards by the run's reward and by the whole student."]
    name = f"{a.task}-selection{share_tag(a)}"
    write_text(os.path.join(a.out, name + ".json"), portable(json.dumps(rows, indent=1)))
    write_text(os.path.join(a.out, name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def selection_row(d, members, team, seed):
    """One run's selection: each teacher's evidence by bench name, and the harmful teacher's gap to the
    kept teachers in standard errors of the paired step-by-step difference (the smallest gap)."""
    names = [os.path.basename(t) for t in d["teachers"]]
    evidence = {os.path.basename(t["teacher"]): t for t in d["selection"]}
    rewards, paired = phase1_rewards(d, names)
    harmful = next(n for n in names if members[n][2] == HARMFUL)
    kept = [n for n in names if evidence[n]["kept"] and n != harmful]
    gaps = [gap_z(rewards[k], rewards[harmful], paired) for k in kept]
    means = [statistics.mean(rewards[n]) for n in names]
    row = {"team": team, "seed": seed, "teachers": evidence,
           "harmful_z": min(gaps, default=math.nan),
           "harmful_discarded": not evidence[harmful]["kept"]}
    for key in AUDITS:  # the same runs' evidence by the audit's rewards, every teacher every step
        other = {n: [r[names.index(n)] for r in d.get(key, [])] for n in names}
        other_gaps = [gap_z(other[k], other[harmful], True) for k in kept]
        row["harmful_z_" + key] = min(other_gaps, default=math.nan)
        row["tau_" + key] = kendall_tau(means, [statistics.mean(other[n] or [math.nan])
                                                for n in names])
    return row


def audited_run(argv):
    """run(argv), with two more rewards of every phase-1 step, from the same student, batch, lr and
    held-out examples, over the whole batch (nothing the run computes changes): the lookahead
    through the whole student, and through the output layer from a forward without dropout. Into
    <out_dir>/distribution.json under AUDITS, [steps][K] each. A killed run starts afresh, as the
    steps before its kill would be missing."""
    out_dir = distill.parse_args(argv).out_dir
    if os.path.isfile(os.path.join(out_dir, "resume.pt")):
        os.remove(os.path.join(out_dir, "resume.pt"))
    audit = {key: [] for key in AUDITS}
    h = {}
    real = distill.Reward.before

    def before(self, student, idx, step, lr, active=None):
        real(self, student, idx, step, lr, active)
        if self.is_lookahead and all(active or [True]):  # (phase-2 plays without the discarded)
            audit_step(self, student, idx, step, lr, h, audit)

    distill.Reward.before = before
    try:
        metrics = run(argv)
    finally:
        distill.Reward.before = real
    path = os.path.join(out_dir, "distribution.json")
    with open(path) as f:
        d = json.load(f)
    if audit["whole_student"]:  # (a run reused as it was keeps what it has, if anything)
        steps = len(d["phase1"])
        glue_data.write_json(path, d | {key: values[:steps] for key, values in audit.items()})
    return metrics


def audit_step(reward, student, idx, step, lr, h, audit):
    """The AUDITS rewards of one step into audit; h: {key: its h}, measured anew on the held-out
    batch of the reward's own (the same every --probe_every steps)."""
    L, a = reward.loop, reward.loop.args
    if step % a.probe_every == 0 or not h:
        held, j = L.batch(reward.probe(step)[L.rank::L.world])
        h["whole_student"] = distill.heldout_grad(student, held, L.labels[j])
        h["output_no_dropout"] = distill.heldout_output_grad(student, held, L.labels[j])
    batch, i = L.batch(idx)
    rest = (L.labels[i], reward.soft[:, i])
    kd_flags = (lr, a.temperature, a.alpha, L.labelled[i])
    whole = distill.lookahead_rewards(student, batch, *rest, h["whole_student"], *kd_flags)
    student.eval()
    with torch.no_grad():
        u, z = distill.features_and_logits(student, batch)
    student.train()
    output = distill.output_layer_rewards(u, z, *rest, h["output_no_dropout"], *kd_flags)
    audit["whole_student"].append(whole.tolist())
    audit["output_no_dropout"].append(output.tolist())


# ------------------------------------------------------------------------------- --first_run
GOOGLE_SHAPE = re.compile(r"google/bert_uncased_L-(\d+)_H-(\d+)_A-(\d+)$")


def recipe_hub(home, recipe, tokenizer_from):
    """A hub cache under home holding, under each hub name of the recipe (teachers and student),
    a BERT of that name's configuration (Turc et al.'s compact BERTs: L layers, hidden H, A heads,
    feed-forward 4H; BERT-base's otherwise) with random weights and tokenizer_from's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    names = [checkpoint for checkpoint, _ in recipe.teachers.values()] + [recipe.student]
    for name in names:
        shape = GOOGLE_SHAPE.search(name)
        layers, hidden, heads = map(int, shape.groups()) if shape else (12, 768, 12)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden)
        repo = os.path.join(home, "hub", "models--" + name.replace("/", "--"))
        snapshot = os.path.join(repo, "snapshots", "0" * 40)
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        write_text(os.path.join(repo, "refs", "main"), "0" * 40)


def first_run(a):
    """The default command twice in an empty folder, offline, timed: results/first-run-<device>."""
    work = os.path.abspath(os.path.join(a.out, "first-run"))
    shutil.rmtree(work, ignore_errors=True)
    home = os.path.join(work, "hf")
    recipe = team_lib.RECIPES["small"]
    recipe_hub(home, recipe, a.base_model)
    folder = os.path.join(work, "user")
    shutil.copytree(os.path.join(a.data_dir, a.task), os.path.join(folder, "glue_data", a.task))
    env = dict(os.environ, HF_HOME=home, HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill.py"),
               "--task", a.task]
    seconds = []
    for attempt in ("first", "second"):
        start = time.perf_counter()
        with open(os.path.join(work, f"{attempt}.log"), "w") as log:
            subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds.append(time.perf_counter() - start)
        print(f"{attempt} run: {seconds[-1]:.0f} s", flush=True)
    first_run_report(a, folder, recipe, seconds)


def first_run_report(a, folder, recipe, seconds):
    """results/first-run-<device>.json and .md: both runs, the teachers' fine-tuning one by one."""
    parts = {}
    for t in recipe.teachers:
        with open(os.path.join(folder, "teachers", a.task, t, "metrics.json")) as f:
            parts[f"fine-tune {t}"] = json.load(f)["timings"]["total_s"]
    with open(os.path.join(folder, "runs", f"{a.task}-auto-seed0", "metrics.json")) as f:
        parts["AutoSKD and the student, second run"] = json.load(f)["timings"]["total_s"]
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else \
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch's default threads"
    result = {"device": device, "platform": platform.platform(), "torch": torch.__version__,
              "task": a.task, "first_run_s": seconds[0], "second_run_s": seconds[1], "parts_s": parts}
    lines = [f"`python distill.py --task {a.task}` in an empty folder holding the {a.task} files, "
             f"offline, the small recipe's checkpoints served from a local hub cache (their exact "
             f"configurations, random weights); measured on {device} ({result['platform']}, torch "
             f"{torch.__version__}), wall time.", "", "| run | minutes |", "|---|---|",
             f"| first (the team fine-tuned, then AutoSKD) | {seconds[0] / 60:.1f} |",
             f"| second (data, teachers and their outputs reused) | {seconds[1] / 60:.1f} |"]
    lines += [f"| {name} | {s / 60:.1f} |" for name, s in parts.items()]
    tag = "gpu" if DEVICE.type == "cuda" else "cpu"
    write_text(os.path.join(a.out, f"first-run-{tag}.json"), portable(json.dumps(result, indent=1)))
    write_text(os.path.join(a.out, f"first-run-{tag}.md"), portable("\n".join(lines) + "\n"))
    print("\n".join(lines))


# ------------------------------------------------------------------------------- --speed
def measured(argv):
    """distill.main afresh in this process (one thread): (metrics.json, peak memory in MiB)."""
    torch.set_num_threads(1)
    shutil.rmtree(distill.parse_args(argv).out_dir, ignore_errors=True)
    cpu = time.process_time()
    metrics = run(argv)
    metrics["timings"]["cpu_s"] = time.process_time() - cpu  # the whole run, in CPU time
    if DEVICE.type == "cuda":
        return metrics, torch.cuda.max_memory_allocated() / 2 ** 20
    return metrics, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def in_fresh_process(argv):
    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        return pool.submit(measured, argv).result()


def padding(lengths, batch_size, generator=None):
    """Padded tokens / real tokens of glue_data.batches over these lengths."""
    lengths = torch.as_tensor(lengths)
    order = glue_data.batches(lengths, batch_size, generator, group=1)  # group=1: no sorting by length
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
    team_lib.load_team(dirs, a.task, data, a.max_seq_len, cache, DEVICE)
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
    student = kd.build_student(a.base_model, labels, a.student_layers, a.task)[0].to(DEVICE).eval()
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
    have = kd.layers_to_keep(a.base_model)
    dirs = [os.path.join(work, "teachers", f"T{i}") for i in range(8)]
    for i, d in enumerate(dirs):
        if os.path.isfile(os.path.join(d, "config.json")):
            continue
        torch.manual_seed(i)
        layers = min(have, [6, 4, 3, 2][i % 4])
        model, tok = kd.build_student(a.base_model, labels, layers, a.task)
        model.save_pretrained(d)
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
    lines += ["", "| run | peak memory (MiB) | whole run (s) | step (ms): phase-1, phase-2, final | "
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
              f"of 64 sorted by length: {100 * (result['padding_sorted'] - 1):.1f}% padding tokens, "
              f"against {100 * (result['padding_unsorted'] - 1):.1f}% in random order."]
    tag = "gpu" if DEVICE.type == "cuda" else "cpu"
    write_text(os.path.join(a.out, f"speed-{tag}.json"), portable(json.dumps(result, indent=1)))
    write_text(os.path.join(a.out, f"speed-{tag}.md"), portable("\n".join(lines) + "\n"))
    print("\n".join(lines))


def cpu_name():
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, a run that cannot be reused: one line
        sys.exit(f"error: {e}")
