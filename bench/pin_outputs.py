"""Pin behaviour across a restructuring: the same tiny runs must write the same outputs.

    python -m bench.pin_outputs                 # this working tree against HEAD
    python -m bench.pin_outputs --against REV   # ... against any commit

It checks REV out into a temporary git worktree, makes tiny data (RTE and STS-B in their published
formats) and a local hub holding tiny checkpoints under the small recipe's names, then runs the same
command lines with both code trees, offline, one thread each, and compares what every run wrote:
metrics.json (timings aside), distribution.json, the model card, the test predictions, the
student's config and weights. The runs cover every strategy, both rewards, both reaches of the
lookahead and a share of the batch, a transfer set, a team built from a recipe, regression,
--predict_test, and runs killed in phase-1, phase-2 and the final training then resumed (the
step reward, the whole-student reach and an ensemble too).
Exit 0 when every value is the same; else each difference is listed.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
FAST = ["--student_layers", "1", "--epochs", "1", "--batch_size", "16", "--lr", "1e-3"]
TEAM_DIR = "teachers/RTE"
RECIPE_TEACHERS = ["L-4_H-256", "L-4_H-512", "L-8_H-512"]
TRANSFER = "glue_data/RTE/test.tsv"
STSB_TEACHERS = ["teachers/STS-B/a", "teachers/STS-B/b"]
# Kill after this many optimizer steps, then resume: in phase-1, phase-2 and the final training
# (phases of 6 steps: 87 training examples in batches of 16).
KILLS = {"phase1": 4, "phase2": 9, "final": 15}


def runs(hub_student):
    """[(out_dir, distill.py arguments, optimizer steps before a kill or None)], in order."""
    rte = ["--task", "RTE"]
    stsb = ["--task", "STS-B"] + FAST
    out = [("runs/RTE-auto-seed0", rte + ["--epochs", "1", "--predict_test"], None)]
    for strategy in ("uniform", "skd", "ensemble"):
        out.append((f"runs/{strategy}", rte + FAST + ["--strategy", strategy], None))
    single = ["--strategy", "single", "--teachers", f"{TEAM_DIR}/{RECIPE_TEACHERS[0]}"]
    out.append(("runs/single", rte + FAST + single, None))
    out.append(("runs/none", rte + FAST + ["--strategy", "none", "--student", hub_student], None))
    out.append(("runs/step", rte + FAST + ["--reward", "step"], None))
    out.append(("runs/whole", rte + FAST + ["--reward_reach", "student"], None))
    out.append(("runs/share", rte + FAST + ["--lookahead_share", "0.5"], None))
    out.append(("runs/transfer", rte + FAST + ["--transfer", TRANSFER], None))
    for phase, steps in KILLS.items():
        out.append((f"runs/killed-{phase}", rte + FAST + ["--save_every", "4"], steps))
    for name, flags, steps in [("step", ["--reward", "step"], KILLS["phase1"]),
                               ("whole", ["--reward_reach", "student"], KILLS["phase2"]),
                               ("ensemble", ["--strategy", "ensemble"], 3)]:
        out.append((f"runs/killed-{name}", rte + FAST + flags + ["--save_every", "2"], steps))
    for k, teacher in enumerate(STSB_TEACHERS):
        fine_tune = ["--strategy", "none", "--student", hub_student, "--seed", str(k)]
        out.append((teacher, stsb + fine_tune, None))
    out.append(("runs/stsb", stsb + ["--teachers"] + STSB_TEACHERS + ["--predict_test"], None))
    return out


# Speeds measured in the run (the closing table's dev examples a second) differ from run to run.
SPEED_CELL = re.compile(r"^((?:\|[^|\n]*){3}\|) [0-9.]+ \|", re.M)  # the table's fourth column
FASTER = re.compile(r"runs [0-9.]+x faster")


def without_speeds(text):
    return FASTER.sub("runs ?x faster", SPEED_CELL.sub(r"\1 ? |", text))


KILLER = """import sys
import torch
sys.path.insert(0, {tree!r})
import distill
real, calls = torch.optim.AdamW.step, []
def step(self, *a, **k):
    calls.append(1)
    if len(calls) == {steps}:
        raise KeyboardInterrupt
    return real(self, *a, **k)
torch.optim.AdamW.step = step
try:
    distill.main(distill.parse_args(sys.argv[1:]))
except KeyboardInterrupt:
    sys.exit(3)
"""


def make_world(root):
    """Tiny data and a local hub, shared by both trees: (env, the hub name a student comes from)."""
    sys.path.insert(0, ROOT)
    import teachers
    from test_all import fake_hub_home, write_task  # the suite's tiny checkpoints and data
    recipe = teachers.RECIPES["small"]
    names = [c for c, _ in recipe.teachers.values()] + [recipe.student]
    home = fake_hub_home(os.path.join(root, "hf"), names)
    for task in ("RTE", "STS-B"):
        write_task(os.path.join(root, "data"), task, n_train=96, n_dev=32)
    env = dict(os.environ, HF_HOME=home, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env, recipe.student


def run_tree(tree, work, data, env, hub_student):
    """Every run of runs() with the code in tree, in the folder work; returns the failures."""
    os.makedirs(work)
    os.symlink(data, os.path.join(work, "glue_data"))
    env = dict(env, PYTHONPATH=tree)
    failures = []
    for out_dir, argv, kill in runs(hub_student):
        argv = argv + ["--out_dir", out_dir]
        script = [os.path.join(tree, "distill.py")]
        if kill:
            script = ["-c", KILLER.format(tree=tree, steps=kill)]
            p = subprocess.run([sys.executable] + script + argv, cwd=work, env=env,
                               capture_output=True, text=True)
            if p.returncode != 3:
                failures.append(f"{tree}: {out_dir} was not killed: {p.stderr[-2000:]}")
            script = [os.path.join(tree, "distill.py")]
            argv = argv + ["--resume"]
        p = subprocess.run([sys.executable] + script + argv, cwd=work, env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            failures.append(f"{tree}: {' '.join(argv)} failed: {p.stderr[-2000:]}")
    return failures


def digest(folder):
    """{file: content} of what one run wrote, as plain values; timings dropped, weights hashed."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".json") and name != "tokenizer.json":
            with open(path) as f:
                value = json.load(f)
            if name == "metrics.json":
                value.pop("timings")
                table = value.get("beside_the_team") or {}
                for row in list(table.get("teachers", {}).values()) + [table.get("student", {})]:
                    row.pop("examples_per_s", None)
                table.get("summary", {}).pop("faster", None)
                table["lines"] = [without_speeds(line) for line in table.get("lines", [])]
            out[name] = value
        elif name.endswith((".tsv", ".md")):
            with open(path) as f:
                out[name] = without_speeds(f.read())
        elif name.endswith(".safetensors"):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def differences(a, b, where=""):
    """Every place where two plain values differ, as lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                lines.append(f"{where}/{k}: only in {'after' if k in b else 'before'}")
            else:
                lines += differences(a[k], b[k], f"{where}/{k}")
        return lines
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in
                differences(x, y, f"{where}[{i}]")]
    if a != b:
        return [f"{where}: {str(a)[:200]!r} before, {str(b)[:200]!r} after"]
    return []


def check_outputs():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", default="HEAD", help="the commit whose outputs are the reference")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        old = os.path.join(root, "before")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old, a.against],
                       check=True, capture_output=True)
        try:
            env, hub_student = make_world(root)
            data = os.path.join(root, "data")
            trees = {"before": old, "after": ROOT}
            with ThreadPoolExecutor(2) as pool:  # the two trees side by side, one thread each
                jobs = {side: pool.submit(run_tree, tree, os.path.join(root, "work-" + side), data,
                                          env, hub_student) for side, tree in trees.items()}
                failures = [f for job in jobs.values() for f in job.result()]
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old], check=True)
        if failures:
            sys.exit("\n".join(failures))
        folders = [out_dir for out_dir, _, _ in runs(hub_student)]
        folders += [f"{TEAM_DIR}/{t}" for t in RECIPE_TEACHERS]
        found = []
        for folder in folders:
            before = digest(os.path.join(root, "work-before", folder))
            after = digest(os.path.join(root, "work-after", folder))
            found += differences(before, after, folder)
        n_values = len(folders)
    if found:
        sys.exit(f"{len(found)} differences against {a.against}:\n" + "\n".join(found))
    print(f"the same outputs as {a.against}: {n_values} runs, every value")


if __name__ == "__main__":
    check_outputs()
