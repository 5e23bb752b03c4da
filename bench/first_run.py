"""python -m bench --first_run: what a new user waits for, `python distill.py --task RTE` in an
empty folder."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch
from transformers import AutoTokenizer

import teachers
from bench.common import DEVICE, portable, write_text
from bench.speed import cpu_name


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
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
    recipe = teachers.RECIPES["small"]
    recipe_hub(home, recipe, a.base_model)
    folder = os.path.join(work, "user")
    shutil.copytree(os.path.join(a.data_dir, a.task), os.path.join(folder, "glue_data", a.task))
    env = dict(os.environ, HF_HOME=home, HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.join(ROOT, "distill.py"),
               "--task", a.task]
    seconds = []
    for attempt in ("first", "second"):
        start = time.perf_counter()
        with open(os.path.join(work, f"{attempt}.log"), "w") as log:
            subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                           check=True)
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
              "task": a.task, "first_run_s": seconds[0], "second_run_s": seconds[1],
              "parts_s": parts}
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
