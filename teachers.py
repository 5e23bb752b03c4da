"""The teacher team: fine-tuned checkpoints checked against the task, their outputs computed once.

Paper: AutoSKDBERT distils from a predefined team of fine-tuned teachers of different capacities.
Teachers are frozen, so each one's logits are computed ONCE (one teacher in memory at a time, in
batches sorted by length, through its own tokenizer: any AutoModelForSequenceClassification serves)
and cached on disk under a hash of the checkpoint's files, the data files, the task and the max
length. A training step reads its teacher's soft targets from a tensor instead of running it.

Recipes are teams this project can fine-tune itself (RECIPES); build_team fine-tunes a recipe's
missing teachers with the fine-tuning it is handed (distill.py's own plain fine-tuning).
"""
import gc
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import glue_data
from model import check_weight_files

transformers.logging.disable_progress_bar()
CACHE_VERSION = 1  # bump when what is cached changes
CHECKPOINT_FILES = (".json", ".safetensors", ".bin", ".txt", ".model")  # what a checkpoint is
FAR_BETTER = 0.25  # training accuracy another order of a teacher's outputs must add to be warned of

class TeamError(ValueError):
    """A teacher that cannot serve this task, or no team at all."""

@dataclass
class Teacher:
    name: str
    train: torch.Tensor  # [N + M, C] logits on train, then on the transfer set (regression: C = 1)
    dev_metrics: dict    # {dev split: {metric: value}}

@dataclass
class Recipe:
    """A team this project can fine-tune itself: {name: (checkpoint, learning rate)}, the epochs
    (task -> epochs), the batch size, and the student AutoSKD distils with it (its bottom
    student_layers layers; None: all)."""
    teachers: dict
    epochs: object
    student: str
    student_layers: int = None
    batch_size: int = 32

GOOGLE = "google/bert_uncased_L-{}_H-{}_A-{}"  # Turc et al. 2019, "Well-Read Students Learn Better"
RECIPES = {
    # Compact BERTs of different capacities: the whole command takes minutes on a laptop CPU.
    "small": Recipe({"L-4_H-256": (GOOGLE.format(4, 256, 4), 1e-4),
                     "L-4_H-512": (GOOGLE.format(4, 512, 8), 1e-4),
                     "L-8_H-512": (GOOGLE.format(8, 512, 8), 5e-5)},
                    epochs=lambda task: 4, student=GOOGLE.format(2, 128, 2)),
    # The team SKDBERT's supplement lists for this line of work, fine-tuned as it reports (batch 32;
    # 10 epochs on MRPC and RTE, 3 elsewhere; lower learning rates for the large models). For a GPU.
    "paper": Recipe({"L-8_H-768": (GOOGLE.format(8, 768, 12), 2e-5),
                     "L-10_H-768": (GOOGLE.format(10, 768, 12), 2e-5),
                     "base": ("google-bert/bert-base-uncased", 2e-5),
                     "large": ("google-bert/bert-large-uncased", 1e-5),
                     "large-wwm": ("google-bert/bert-large-uncased-whole-word-masking", 1e-5)},
                    epochs=lambda task: 10 if task in ("MRPC", "RTE") else 3,
                    student="google-bert/bert-base-uncased", student_layers=6),
}

def choose_team(teachers, task_name, team, fine_tune, n_train):
    """(teacher checkpoints, sorted: a draw picks by position, so the order named decides nothing;
    the recipe they come from, or None). With none named, the folders in teachers/<TASK>/, where
    the team recipe is fine-tuned first when none are there (or its build was killed)."""
    folder = os.path.join("teachers", task_name)
    recipe = None if teachers else build_team(folder, team, task_name, fine_tune, n_train)
    return sorted(teachers or find_teachers(folder)), recipe

def build_team(folder, team, task_name, fine_tune, n_train):
    """The recipe of the team in folder (its team.json), its missing teachers fine-tuned first, each
    by fine_tune(teacher, checkpoint, lr, epochs, batch_size, out_folder), which goes on from a
    killed run; None when the folder holds teachers made otherwise. team: the recipe asked for
    (None: the one there, or small); n_train: training examples (the plan shows the steps)."""
    team_file = os.path.join(folder, "team.json")
    if os.path.isfile(team_file):
        with open(team_file) as f:
            name = json.load(f)["recipe"]
        if team and team != name:
            raise TeamError(f"{folder}/ holds the {name} team: pass --team {name}, "
                            f"or --teachers DIR [DIR ...]")
    elif find_teachers(folder):
        return None  # teachers made by hand
    else:
        name = team or "small"
    if name not in RECIPES:
        raise TeamError(f"--team {name}: no such recipe (choose {' or '.join(RECIPES)})")
    recipe = RECIPES[name]
    done = [t for t in recipe.teachers if os.path.isfile(os.path.join(folder, t, "metrics.json"))]
    todo = [t for t in recipe.teachers if t not in done]
    if not todo:
        return recipe
    epochs = recipe.epochs(task_name)
    steps = epochs * math.ceil(n_train / recipe.batch_size)
    print(f"building the {name} team in {folder}/ ({len(todo)} of {len(recipe.teachers)} teachers "
          f"to fine-tune, {epochs} epochs each, batch {recipe.batch_size}), then AutoSKD:")
    for t in recipe.teachers:
        checkpoint, lr = recipe.teachers[t]
        print(f"  {t}: {checkpoint}, lr {lr}, " + (f"{steps} steps" if t in todo else "there"))
    for t in todo:  # every checkpoint reachable before hours go into the first
        check_checkpoint(recipe.teachers[t][0], name)
    os.makedirs(folder, exist_ok=True)
    glue_data.write_json(team_file, {"recipe": name})
    for t in todo:
        checkpoint, lr = recipe.teachers[t]
        fine_tune(t, checkpoint, lr, epochs, recipe.batch_size, os.path.join(folder, t))
    return recipe

def check_checkpoint(checkpoint, team):
    """Stop with one sentence when a recipe's checkpoint cannot be had (offline, say)."""
    try:
        AutoConfig.from_pretrained(checkpoint)
        AutoTokenizer.from_pretrained(checkpoint)
    except OSError as e:
        reason = str(e).splitlines()[0]
        raise TeamError(f"could not download {checkpoint} for the {team} team ({reason}): check "
                        f"the connection, or pass your own team with --teachers DIR [DIR ...] "
                        f"and --student") from None

def recorded_base(names):
    """The checkpoint the teachers were fine-tuned from, as the first that records one says."""
    configs = [AutoConfig.from_pretrained(local_folder(n)) for n in names]
    base = next((c.base_model for c in configs if getattr(c, "base_model", None)), None)
    if not base:
        raise TeamError("the teachers do not record the checkpoint they were fine-tuned from: "
                        "pass --student <name or folder>")
    return base

def find_teachers(root):
    """Every checkpoint folder (one holding config.json) directly under root, sorted by name."""
    subs = sorted(os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(root) else []
    return [d for d in subs if os.path.isfile(os.path.join(d, "config.json"))]

def local_folder(name):
    """The folder holding a checkpoint: a local folder as is, a hub name downloaded (or cached)."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise TeamError(f"teacher {name} is not a checkpoint folder (no config.json)")
        return name
    from huggingface_hub import snapshot_download  # comes with transformers; only for hub names
    try:
        return snapshot_download(name, allow_patterns=["*" + ext for ext in CHECKPOINT_FILES])
    except Exception as e:
        raise TeamError(f"teacher {name} is neither a local folder nor a model on the hub "
                        f"({e})") from None

def check_teacher(name, folder, task_name):
    """Refuse a teacher fine-tuned for another task, or with other labels or another label order."""
    config = AutoConfig.from_pretrained(folder)
    ours = [l.lower() for l in glue_data.get_task(task_name).labels or ["score"]]
    trained_on = getattr(config, "glue_task", None)
    if trained_on and trained_on != task_name:
        raise TeamError(f"teacher {name} was fine-tuned on {trained_on}, not {task_name}")
    if config.num_labels != len(ours):
        raise TeamError(f"teacher {name} has {config.num_labels} outputs; "
                        f"{task_name} needs {len(ours)}")
    check_weight_files(folder)
    theirs = [str(config.id2label[i]).lower() for i in range(len(ours))]
    # Names like LABEL_0 or NEGATIVE say nothing of our order; the same names in another order do.
    if sorted(theirs) == sorted(ours) and theirs != ours:
        raise TeamError(f"teacher {name} orders its labels {theirs}; {task_name} needs {ours}")

def fingerprint(folder, task_name, data, max_len):
    """sha256 of everything the cached logits depend on: the checkpoint's files, the data's files
    ({split: Examples}, each knowing its file), the task and the max length."""
    h = hashlib.sha256(f"v{CACHE_VERSION} {task_name} {max_len}".encode())
    files = [examples.source for examples in data.values()]
    files += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
              if f.endswith(CHECKPOINT_FILES)]
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()

@torch.inference_mode()
def predict(model, tokenizer, examples, max_len, device, batch_size=64, desc=None):
    """Model outputs for examples in their original order, [N, C] float32. Under torch.distributed
    each rank runs every world-th batch and the sum over ranks fills in the rest."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    enc = glue_data.encode(tokenizer, examples, max_len)
    out = torch.zeros(len(examples), model.config.num_labels, device=device)
    by_length = glue_data.batches(glue_data.lengths(enc), batch_size)  # little padding
    todo = by_length[rank::world]
    for idx in tqdm(todo, desc, disable=desc is None, mininterval=1):
        batch = {k: v.to(device) for k, v in glue_data.collate(tokenizer, enc, idx).items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out[idx] = model(**batch).logits.float()
    if world > 1:
        dist.all_reduce(out)  # each row is nonzero on one rank only
    return out.cpu()

def load_teacher(folder, device):
    """(model in eval mode on device, its tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval(), tokenizer

def teacher_outputs(folder, name, data, max_len, device):
    """{split: logits} for every split of data, running the teacher once."""
    model, tokenizer = load_teacher(folder, device)
    outputs = {}
    for split, examples in data.items():
        desc = f"teacher {name} {split}"
        outputs[split] = predict(model, tokenizer, examples, max_len, device, desc=desc)
    del model
    gc.collect()  # one teacher in memory at a time (on GPU its freed blocks serve the next teacher)
    return outputs

def load_team(names, task_name, data, max_len, cache_dir, device):
    """Check, run (or read from the cache) and score every teacher: a list of Teacher. data:
    {split: Examples}, with an unlabelled "transfer" split when there is a transfer set."""
    if not names:
        raise TeamError("no teachers given")
    folders = [local_folder(name) for name in names]
    for name, folder in zip(names, folders):  # refuse a misfit before any teacher runs
        check_teacher(name, folder, task_name)
    team = []
    for name, folder in zip(names, folders):
        outputs = cached_outputs(name, folder, task_name, data, max_len, cache_dir, device)
        dev = [s for s in outputs if s not in ("train", "transfer")]
        metrics = {s: glue_data.compute_metrics(task_name, outputs[s], data[s].labels) for s in dev}
        check_label_order(name, task_name, outputs["train"], data["train"].labels)
        transfer = outputs.get("transfer", outputs["train"][:0])
        train = torch.cat([outputs["train"], transfer])  # [N + M, C]
        team.append(Teacher(name, train, metrics))
        print(f"teacher {name}: {glue_data.show(metrics)}")
    return team

# ------------------------------------------------------------------- the student beside its team
SPEED_EXAMPLES = 128  # dev examples each model of the closing table is timed on

def size_and_speed(model, tokenizer, examples, max_len, device):
    """(parameters, dev examples a second): the model's weights counted, its inference timed on
    the first SPEED_EXAMPLES examples in predict's batches (64, sorted by length) after a warm-up
    on 8. Every model is timed alike in one process: the ratios hold where the figures do not."""
    sample = examples.head(SPEED_EXAMPLES)
    predict(model, tokenizer, sample.head(8), max_len, device)  # warm-up
    start = time.perf_counter()
    predict(model, tokenizer, sample, max_len, device)  # (its outputs on the host: synchronized)
    seconds = time.perf_counter() - start
    return sum(p.numel() for p in model.parameters()), len(sample) / seconds

def beside_the_team(team, student, tokenizer, examples, max_len, device):
    """{"teachers": {name: (parameters, examples a second)}, "student": (...)}: the student and
    every teacher (loaded again, one at a time) measured by size_and_speed on the same examples;
    None without a team."""
    if not team:
        return None
    teachers = {}
    for t in team:
        model, teacher_tokenizer = load_teacher(local_folder(t.name), device)
        teachers[t.name] = size_and_speed(model, teacher_tokenizer, examples, max_len, device)
        del model
        gc.collect()
    student_figures = size_and_speed(student, tokenizer, examples, max_len, device)
    return {"teachers": teachers, "student": student_figures}

def closing_table(team, figures, score, kept, final):
    """The student beside its team, as plain data: {"teachers": {name: row}, "student": row,
    "summary", "lines"}; a row: parameters, dev score, dev examples a second (figures, from
    beside_the_team), selection's verdict (kept: a bool per teacher, or None) and final p. The
    summary compares the student with the largest teacher (parameters) and the best (dev score)."""
    rows = {}
    verdict = {True: "kept", False: "discarded"}
    for k, t in enumerate(team):
        parameters, speed = figures["teachers"][t.name]
        rows[t.name] = {"parameters": parameters, "score": glue_data.score(t.dev_metrics),
                        "examples_per_s": speed, "selection": verdict[kept[k]] if kept else "-",
                        "p": final[k]}
    parameters, speed = figures["student"]
    student = {"parameters": parameters, "score": score, "examples_per_s": speed}
    largest = max(rows, key=lambda n: rows[n]["parameters"])
    best = max(rows, key=lambda n: rows[n]["score"])
    best_score = rows[best]["score"]
    summary = {"largest": largest, "best": best,
               "fewer_parameters": rows[largest]["parameters"] / parameters,
               "faster": speed / rows[largest]["examples_per_s"],
               "score_kept": score / best_score if best_score > 0 else None}
    table = {"teachers": rows, "student": student, "summary": summary}
    return table | {"lines": table_lines(rows, student, summary)}

def table_lines(rows, student, summary):
    """closing_table's figures as a markdown table and one sentence."""
    lines = ["| model | parameters | dev score | dev examples/s | selection | final p |",
             "| --- | --- | --- | --- | --- | --- |"]
    every = list(rows.items()) + [("student", student | {"selection": "-", "p": None})]
    for name, r in every:
        p = "-" if r["p"] is None else f"{r['p']:.3f}"
        shown = os.path.basename(os.path.normpath(name))
        lines.append(f"| {shown} | {r['parameters'] / 1e6:.2f}M | {r['score']:.4f} | "
                     f"{r['examples_per_s']:.0f} | {r['selection']} | {p} |")
    share = summary["score_kept"]
    share = "-" if share is None else f"{100 * share:.1f}%"
    lines.append("")
    lines.append(f"The student has {summary['fewer_parameters']:.1f}x fewer parameters and runs "
                 f"{summary['faster']:.1f}x faster than the largest teacher "
                 f"({os.path.basename(summary['largest'])}), and keeps {share} of the best "
                 f"teacher's dev score ({os.path.basename(summary['best'])}).")
    return lines

def cached_outputs(name, folder, task_name, data, max_len, cache_dir, device):
    """{split: logits} of one teacher, from the cache, or computed and cached (rank 0 writes)."""
    key = fingerprint(folder, task_name, data, max_len)
    short = os.path.basename(os.path.normpath(name)).replace("/", "_")
    path = os.path.join(cache_dir, task_name, f"{short}-{key[:16]}.pt")
    outputs = read_cache(path, key, data)
    if outputs is not None:
        return outputs
    outputs = teacher_outputs(folder, name, data, max_len, device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        saved = {"key": key, "outputs": outputs}
        glue_data.write_atomic(path, lambda f: torch.save(saved, f), binary=True)
    return outputs

def check_label_order(name, task_name, logits, labels):
    """A warning when a teacher's training outputs fit the labels far better read in another order
    (its head follows a label order other than its config says): it may still serve, as a harmful
    teacher for AutoSKD to discard, but the checkpoint may rather want fixing."""
    names = glue_data.get_task(task_name).labels
    if names is None:
        return  # regression: one output
    own = glue_data.accuracy(logits.argmax(-1).tolist(), labels)
    fits = []  # (training accuracy, the label each output is read as)
    for perm in itertools.permutations(range(len(names))):
        accuracy = glue_data.accuracy(logits[:, list(perm)].argmax(-1).tolist(), labels)
        read_as = [names[perm.index(i)] for i in range(len(names))]  # output i read as this label
        fits.append((accuracy, read_as))
    best, read_as = max(fits)
    if best >= own + FAR_BETTER:
        print(f"warning: teacher {name} fits the training labels far better with its outputs "
              f"read as {read_as} (training accuracy {best:.3f}) than in its own order {names} "
              f"({own:.3f}); it is used as it is")


def read_cache(path, key, data):
    """The cached outputs if the file is whole and matches key and data sizes, else None."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, weights_only=True)
        outputs = saved["outputs"]
        sizes_match = all(len(outputs[s]) == len(examples) for s, examples in data.items())
        if saved["key"] == key and sizes_match:
            return outputs
    except Exception:  # truncated or corrupt: recompute rather than trust it
        pass
    print(f"note: cache {path} is stale or damaged; recomputing")
