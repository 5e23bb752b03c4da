"""Reproduce the paper's comparison on real GLUE data: every strategy, one team, student and budget.
Run from the repository's top folder; one module a mode (strategies.py: the first two commands
below; selection.py, speed.py, first_run.py), common.py builds the team and runs distill.py,
stats.py holds the statistics.

    python -m bench --task MRPC --base_model <hub name or folder>

1. fine-tunes the team once (reused when present) with distill.py's own `--strategy none`:
   teachers of different capacities from --base_model, one ineffective teacher trained on shuffled
   labels, and one harmful teacher that contradicts the best-placed one (common.TEAM);
2. runs none, single (once per teacher: the ground truth of what each teacher is worth to this
   student), ensemble, uniform and auto for every seed, each through distill.main (no second
   implementation); a finished run is reused (one made with other flags stops the bench);
3. writes results/<TASK>.json (every seed's figures), results/<TASK>.md (the tables: each teacher's
   dev score and fit of the training labels beside what it is worth to the student, does auto beat
   uniform and ensemble, does it discard the harmful teacher, does its p rank the teachers as the
   ground truth does, and how much teacher signal its reward carries) and
   results/<TASK>_distribution.png (AutoSKD's weights over phase-1 and phase-2, selection marked).
matplotlib is needed for the picture only (pip install matplotlib).

    python -m bench --task SST-2 --train_limit 8000 --transfer 20000 --base_teacher <folder> \
        --base_model <hub name or folder> [--pilot]

distils in a low-resource setting instead: the teachers learn from 8,000 labelled sentences, and the
students also from 20,000 further ones with their labels dropped (a transfer set, written in the
test-file format), as BERT students are distilled in practice; --base_teacher adds a base-size
teacher to the team, and the rows gain SKDBERT's fixed distributions (skd teacher-rank and
student-rank) and the best teacher without the transfer set. --pilot runs `none` and `single` per
helpful teacher with a 2- and a 4-layer student first, to pick the size where they separate most.
The tables go to results/<TASK>-transfer.{json,md} and results/<TASK>-pilot.md. --auto_again runs
the auto row alone at distill.py's defaults, into results/<TASK>[-transfer]-auto-again.{json,md},
beside the auto row of the tables an earlier full run wrote: what a changed default does, without
rerunning every row.

    python -m bench --selection --task MRPC --base_model <hub name or folder>

runs instead AutoSKD alone, on the same team (the same runs as the full bench's auto row) and on a
team of three (two helpful teachers and the contradicting one, --keep 2, five seeds), and writes
results/<TASK>-selection.md (with --lookahead_share X: <TASK>-selection-shareX.md): each teacher's
phase-1 evidence, its p, what selection made of it, and beside it the same runs' evidence by the
lookahead through the whole student and through the output layer without dropout.

    python -m bench --speed --task MRPC --base_model <hub name or folder>

measures instead what distillation costs next to plain fine-tuning of the same student on the same
batches (step times, also on batches mixed with a transfer set, whole runs, peak memory with 2 and
8 teachers, the cache fill) and writes results/speed-<device>.json and .md. Every run is a fresh
process with one CPU thread (or one GPU).
On CPU, times are the process's CPU time: a virtual machine's host may steal a varying share of the
CPU, which wall time counts and CPU time does not. On GPU, wall time.

    python -m bench --first_run --task RTE --base_model <checkpoint with BERT's uncased vocabulary>

times what a new user waits for: `python distill.py --task RTE` in an empty folder holding the
task's files, then the same command again, each in a fresh process with torch's default threads
(wall time). Offline, the --team recipe's hub names are served from a local hub cache by
checkpoints of their exact configurations with random weights and --base_model's tokenizer (the
real ones are the same shapes, so every step costs what it costs with them). Writes
results/first-run-<device>.{json,md}.
"""
import argparse
import time

from bench.common import make_team, team_members
from bench.first_run import first_run
from bench.selection import selection
from bench.speed import speed
from bench.strategies import auto_again, compare_strategies, pilot


def parse_bench_args(argv=None):
    """Read the bench's flags (argv: a list, default sys.argv); one mode at most."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
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
                   "their labels dropped: a transfer set every student with a teacher distils on")
    p.add_argument("--base_teacher", help="a larger pretrained checkpoint, one more teacher")
    p.add_argument("--base_teacher_lr", type=float, default=3e-5)
    p.add_argument("--base_teacher_epochs", type=int, default=2)
    mode.add_argument("--pilot", action="store_true", help="single per helpful teacher with a 2- "
                      "and a 4-layer student, one seed, instead of the bench (where do they "
                      "separate most?)")
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"),
                   help='an extra auto row with other distill.py flags, e.g. '
                   '--variant slr1 "--sampler_lr 1"')
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one CPU thread each when > 1")
    p.add_argument("--out", default="results")
    mode.add_argument("--selection", action="store_true",
                      help="check teacher selection (see above)")
    p.add_argument("--lookahead_share", type=float, help="distill.py's, for every "
                   "student's run (default: distill.py's)")
    mode.add_argument("--speed", action="store_true",
                      help="measure speed and memory instead (see above)")
    mode.add_argument("--first_run", action="store_true",
                      help="time the default command (see above)")
    mode.add_argument("--auto_again", action="store_true",
                      help="the auto row alone at distill.py's defaults, beside an earlier run's "
                      "(see above)")
    return p.parse_args(argv)


def run_bench(argv=None):
    """The bench the flags ask for."""
    a = parse_bench_args(argv)
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
    if a.auto_again:
        return auto_again(a, members, work, data_dir, dirs, t0)
    return compare_strategies(a, members, work, data_dir, dirs, team, scores, fit, t0)


if __name__ == "__main__":
    run_bench()
