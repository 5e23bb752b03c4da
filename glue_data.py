"""GLUE data: the nine tasks read from their published TSV files, tokenized, batched and scored.

The paper evaluates on the GLUE benchmark (Wang et al., 2019), in the usual download script's layout

    <data_dir>/<TASK>/train.tsv, dev.tsv, test.tsv    (MNLI: dev_matched.tsv, ...)

which this module writes from the public GLUE copy on the Hugging Face hub (needs `datasets`):

    python glue_data.py --download RTE MRPC [--data_dir glue_data]

Here: each task's published columns (Task, read_split), tokens and batches sorted by length
(encode, collate, batches), the official metrics (compute_metrics), files written whole
(write_atomic), and the download (download, or fetch_missing for a task not there yet).
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Task:
    a: object             # column of the first sentence: header name, or position when header=False
    b: object             # column of the second sentence, or None for single-sentence tasks
    label: object         # column of the label
    labels: list          # label strings in model output order; None for regression (STS-B)
    metrics: tuple        # official GLUE metrics
    header: bool = True
    dev: tuple = ("dev",)
    skip_short_rows: bool = False  # QQP: a handful of rows of the public train file miss a question

# Columns and labels as the public GLUE files have them; labels in the order of the hub's GLUE copy
# (nyu-mll/glue), which models fine-tuned on it follow, also when they name them LABEL_0, ...
TASKS = {
    "CoLA": Task(3, None, 1, ["0", "1"], ("mcc",), header=False),  # source, label, mark, sentence
    "SST-2": Task("sentence", None, "label", ["0", "1"], ("accuracy",)),
    "MRPC": Task("#1 String", "#2 String", "Quality", ["0", "1"], ("accuracy", "f1")),
    "STS-B": Task("sentence1", "sentence2", "score", None, ("pearson", "spearman")),
    "QQP": Task("question1", "question2", "is_duplicate", ["0", "1"], ("accuracy", "f1"),
                skip_short_rows=True),
    "MNLI": Task("sentence1", "sentence2", "gold_label", ["entailment", "neutral", "contradiction"],
                 ("accuracy",), dev=("dev_matched", "dev_mismatched")),
    "QNLI": Task("question", "sentence", "label", ["entailment", "not_entailment"], ("accuracy",)),
    "RTE": Task("sentence1", "sentence2", "label", ["entailment", "not_entailment"], ("accuracy",)),
    "WNLI": Task("sentence1", "sentence2", "label", ["0", "1"], ("accuracy",)),
}

class DataError(ValueError):
    """Bad or missing data: the message names the file (and line) and what to do."""

@dataclass
class Examples:
    text_a: list      # [N] str
    text_b: list      # [N] str, or None for single-sentence tasks
    labels: list      # [N] int class index, or float score for STS-B (None: a test file)
    source: str = ""  # the file they were read from

    def __len__(self):
        return len(self.labels)

    def head(self, n):
        """The first n examples."""
        text_b = self.text_b[:n] if self.text_b else None
        return Examples(self.text_a[:n], text_b, self.labels[:n], self.source)

def get_task(name):
    if name not in TASKS:
        near = [t for t in TASKS if t.lower().replace("-", "") == name.lower().replace("-", "")]
        hint = f"did you mean {near[0]}? " if near else ""
        raise DataError(f"unknown task {name!r}; {hint}GLUE tasks are: {', '.join(TASKS)}")
    return TASKS[name]

def load_task(data_dir, task_name, test=False):
    """{split: Examples} for one task: train and dev; with test=True, the test splits
    (test_files)."""
    folder = os.path.join(data_dir, task_name)
    task = get_task(task_name)
    if not os.path.isdir(folder):
        raise DataError(f"no {task_name} data in {folder}: write it with `python glue_data.py "
                        f"--download {task_name} --data_dir {data_dir}`, or pass --data_dir")
    splits = list(test_files(task_name)) if test else ["train", *task.dev]
    paths = {split: os.path.join(folder, split + ".tsv") for split in splits}
    return {split: read_split(path, task_name, labelled=not test) for split, path in paths.items()}

def test_files(task_name):
    """{test split: the name the GLUE server wants for its predictions file}."""
    if task_name == "MNLI":
        return {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}
    return {"test": task_name}

def read_split(path, task_name, labelled=True):
    """Read one TSV file into Examples; a malformed row raises DataError naming file:line. Test
    files (not labelled) all have a header, CoLA's too (its train and dev files have none)."""
    task = get_task(task_name)
    rows = read_rows(path)  # [(line number, fields)]
    header = rows.pop(0)[1] if task.header or not labelled else list(range(4))
    column_a = task.a if task.header or labelled else "sentence"
    column_label = task.label if labelled else None
    missing = [c for c in (column_a, task.b, column_label) if c is not None and c not in header]
    if missing:
        raise DataError(f"{path}:1: header has no column {missing[0]!r} "
                        f"(is this the {task_name} file?)")
    kept = complete_rows(rows, len(header), task.skip_short_rows and labelled, path)
    ia = header.index(column_a)
    text_a = [r[ia] for _, r in kept]
    text_b = None
    if task.b:
        ib = header.index(task.b)
        text_b = [r[ib] for _, r in kept]
    labels = [None] * len(kept)
    if labelled:
        il = header.index(column_label)
        labels = [parse_label(r[il], task, f"{path}:{n}") for n, r in kept]
    return Examples(text_a, text_b, labels, path)

def read_rows(path):
    """[(line number, fields)] of a TSV file's non-empty lines. utf-8-sig drops the byte-order mark
    some MRPC files start with; rows are split on tabs only, with no quote handling: GLUE
    sentences hold unpaired quotes."""
    if not os.path.isfile(path):
        raise DataError(f"missing data file {path}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1)]
    rows = [(n, line.split("\t")) for n, line in lines if line]
    if not rows:
        raise DataError(f"{path} is empty")
    return rows

def complete_rows(rows, width, skip_short, path):
    """The rows with `width` fields; a row of another width raises DataError, unless skip_short
    and it is shorter (QQP: a handful of rows of the public train file miss a question)."""
    kept = [(n, r) for n, r in rows if not (skip_short and len(r) < width)]
    for n, row in kept:
        if len(row) != width:
            raise DataError(f"{path}:{n}: expected {width} tab-separated fields, found {len(row)}")
    if len(kept) < len(rows):
        print(f"note: skipped {len(rows) - len(kept)} incomplete rows of {path} "
              f"(known defect of the public file)")
    if not kept:
        raise DataError(f"{path} holds no examples")
    return kept

def concat(first, second):
    """The examples of first, then those of second (labels None where second has none)."""
    text_b = first.text_b + second.text_b if first.text_b is not None else None
    return Examples(first.text_a + second.text_a, text_b, first.labels + second.labels)

def parse_label(text, task, where):
    if task.labels is None:
        try:
            return float(text)
        except ValueError:
            raise DataError(f"{where}: score {text!r} is not a number") from None
    if text not in task.labels:
        raise DataError(f"{where}: unknown label {text!r}; expected one of {task.labels}")
    return task.labels.index(text)

def label_texts(task_name, logits):
    """Model outputs [N, C] as the task's label strings (STS-B: [N, 1], the score clipped to
    [0, 5])."""
    labels = get_task(task_name).labels
    if labels is None:
        return [f"{min(max(v, 0.0), 5.0):.3f}" for v in logits[:, 0].tolist()]
    return [labels[i] for i in logits.argmax(-1).tolist()]

# ----------------------------------------------------------------------------- tokens and batches
def encode(tokenizer, examples, max_len):
    """Token ids per example, unpadded: {"input_ids": [N][len], "attention_mask": ..., ...}."""
    enc = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_len)
    return {k: list(enc[k]) for k in tokenizer.model_input_names if k in enc}

def lengths(enc):
    return [len(ids) for ids in enc["input_ids"]]

def collate(tokenizer, enc, idx):
    """The examples idx padded to the longest among them: {name: LongTensor [B, L]}."""
    chosen = {name: [rows[i] for i in idx] for name, rows in enc.items()}
    return dict(tokenizer.pad(chosen, return_tensors="pt"))

def batches(lengths, batch_size, generator=None, group=50):
    """Index batches over examples of the given token lengths [N], grouped by length to pad little.
    With a generator (training): shuffle, sort within chunks of `group` batches, cut, shuffle the
    batches, so batches stay random yet hold examples of similar length. Without: sorted by
    length."""
    lengths = torch.as_tensor(lengths)
    if generator is None:
        order = torch.argsort(lengths, stable=True)
    else:
        order = torch.randperm(len(lengths), generator=generator)
        chunks = order.split(batch_size * group)
        order = torch.cat([c[torch.argsort(lengths[c], stable=True)] for c in chunks])
    out = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if generator is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
    return out

# ---------------------------------------------------------------------------------- metrics
def accuracy(pred, gold):
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))

def f1(pred, gold):
    """F1 of the positive class 1, as GLUE reports it for MRPC and QQP: 2 tp / (2 tp + fp + fn)."""
    p = np.asarray(pred) == 1
    g = np.asarray(gold) == 1
    return 2 * float((p & g).sum()) / max(1, p.sum() + g.sum())

def pearson(x, y):
    """Pearson correlation (0 when either side is constant)."""
    x = np.asarray(x, float) - np.mean(x)
    y = np.asarray(y, float) - np.mean(y)
    den = math.sqrt((x @ x) * (y @ y))
    return float(x @ y) / den if den else 0.0

def mcc(pred, gold):
    """Matthews correlation of two binary labelings: their Pearson correlation (phi)."""
    return pearson(pred, gold)

def ranks(x):
    """1-based ranks, ties sharing the mean of their positions."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse].tolist()

def spearman(x, y):
    return pearson(ranks(x), ranks(y))

METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}

def compute_metrics(task_name, logits, gold):
    """The task's official metrics from model outputs [N, C] (STS-B: [N, 1]) and gold labels [N]."""
    task = get_task(task_name)
    pred = logits[:, 0].tolist() if task.labels is None else logits.argmax(-1).tolist()
    return {m: METRICS[m](pred, list(gold)) for m in task.metrics}

def score(dev_metrics):
    """One number for a {split: {metric: value}} result: the mean of all (GLUE's own convention)."""
    values = [v for split in dev_metrics.values() for v in split.values()]
    return sum(values) / len(values)

def show(dev_metrics):
    return ", ".join(f"{s} {m} {v:.4f}" for s, ms in dev_metrics.items() for m, v in ms.items())

# ---------------------------------------------------------------------------------- files
def write_atomic(path, write, binary=False):
    """write(f) into a temporary file, then rename it to path: a kill leaves the old file or the new
    one, and processes writing the same file at once each write their own temporary file. A write
    that fails (a full disk) leaves the old file too, and raises OSError naming path."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"could not write {path} ({e}); "
                      f"the file there before, if any, is unchanged") from None
    os.replace(tmp, path)

def write_json(path, obj):
    write_atomic(path, lambda f: json.dump(obj, f, indent=1))

def write_predictions(task_name, split, labels, folder):
    """One test split's predictions as the GLUE server reads them: <folder>/RTE.tsv (MNLI-m.tsv,
    ...), `index<TAB>prediction`, one row per test example in file order; labels as label_texts
    gives them."""
    path = os.path.join(folder, test_files(task_name)[split] + ".tsv")
    rows = "".join(f"{i}\t{y}\n" for i, y in enumerate(labels))
    write_atomic(path, lambda f: f.write("index\tprediction\n" + rows))
    print(f"wrote {path}: {len(labels)} test predictions")

def check_writable(folder, rank=0):
    """Write a file there: permission bits say nothing to root or on a read-only disk."""
    probe = os.path.join(folder, f".write_test{rank}")
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out_dir {folder} is not writable ({e.strerror})") from None

# ---------------------------------------------------------------------------------- download
HUB = "nyu-mll/glue"  # the public GLUE copy on the Hugging Face hub. Per task: its config, its
# text fields, and the published files' headers, train and dev then test (columns the hub lacks
# stay empty; CoLA's train and dev files have none: source, label, mark, sentence)
HUB_TASKS = {
    "CoLA": ("cola", "sentence", None, None, "index sentence"),
    "SST-2": ("sst2", "sentence", None, "sentence label", "index sentence"),
    "MRPC": ("mrpc", "sentence1", "sentence2", "Quality|#1 ID|#2 ID|#1 String|#2 String",
             "index|#1 ID|#2 ID|#1 String|#2 String"),
    "STS-B": ("stsb", "sentence1", "sentence2",
              "index genre filename year old_index source1 source2 sentence1 sentence2 score",
              "index genre filename year old_index source1 source2 sentence1 sentence2"),
    "QQP": ("qqp", "question1", "question2", "id qid1 qid2 question1 question2 is_duplicate",
            "id question1 question2"),
    "MNLI": ("mnli", "premise", "hypothesis",
             "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
             "sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label",
             "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
             "sentence1_parse sentence2_parse sentence1 sentence2"),
    "QNLI": ("qnli", "question", "sentence", "index question sentence label",
             "index question sentence"),
    "RTE": ("rte", "sentence1", "sentence2", "index sentence1 sentence2 label",
            "index sentence1 sentence2"),
    "WNLI": ("wnli", "sentence1", "sentence2", "index sentence1 sentence2 label",
             "index sentence1 sentence2"),
}
HUB_SPLITS = {"train": "train", "validation": "dev", "validation_matched": "dev_matched",
              "validation_mismatched": "dev_mismatched", "test": "test",
              "test_matched": "test_matched", "test_mismatched": "test_mismatched"}

def one_line(text):
    """A text as a TSV field: a tab or line break would end the field or the row; nothing else
    changes."""
    return str(text).replace("\t", " ").replace("\r", " ").replace("\n", " ")

def hub_to_tsv(task_name, split, records, label_names):
    """Lines of the published TSV file (header first) for one hub split: records [{field: value}]
    with the hub's integer labels (label_names: its class names; test splits: -1) or STS-B's float
    scores."""
    task = get_task(task_name)
    _, field_a, field_b, columns, test_columns = HUB_TASKS[task_name]
    test = split.startswith("test")
    if test:
        columns = test_columns
    header = columns.split("|" if "|" in columns else " ") if columns else list(range(4))
    if task_name == "MNLI" and split.startswith("dev"):  # dev files carry five annotators' labels
        header = header[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
    column_a = "sentence" if test and not task.header else task.a  # CoLA's test file has a header
    lines = ["\t".join(header)] if columns else []
    for r in records:
        label = None if test else label_text(task, r["label"], label_names)
        row = dict.fromkeys(header, "")
        if not columns:  # CoLA's source and mark (* when unacceptable)
            row |= {0: "glue", 2: "" if label == "1" else "*"}
        values = {column_a: r[field_a], task.b: r.get(field_b), "index": r["idx"], "id": r["idx"],
                  task.label: label, "label1": label}
        for column, value in values.items():
            if column in row and value is not None:
                row[column] = one_line(value)
        lines.append("\t".join(row.values()))
    return lines

def label_text(task, label, label_names):
    """A hub label as the published files write it: MNLI, QNLI and RTE name their classes, the
    others write 0/1 (in the hub's own order, which is ours), STS-B its score as the hub holds
    it."""
    if task.labels is None:
        return repr(float(label))  # every digit: float() reads back the very same number
    if label_names and label_names[label] in task.labels:
        return label_names[label]
    return str(label)

def download(tasks, data_dir, load_dataset=None):
    """Write each task's splits (train, dev and test) from the hub's GLUE copy in the layout
    load_task reads. A task's folder appears whole or not at all: written beside, then renamed."""
    if load_dataset is None:
        try:
            from datasets import load_dataset
        except ImportError:
            raise DataError("downloading GLUE needs the datasets package: "
                            "pip install datasets") from None
    for name in tasks:
        get_task(name)
        folder = os.path.join(data_dir, name)
        try:
            hub = load_dataset(HUB, HUB_TASKS[name][0])
        except Exception as e:  # offline, or the hub unreachable
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"could not download {name} from the hub's GLUE copy ({HUB}: "
                            f"{reason}): check the connection, or put the GLUE files in "
                            f"{folder}") from None
        part = folder + ".download"
        os.makedirs(part, exist_ok=True)
        for split in [s for s in HUB_SPLITS if s in hub]:
            names = getattr(hub[split].features["label"], "names", None)
            lines = hub_to_tsv(name, HUB_SPLITS[split], hub[split], names)
            path = os.path.join(part, HUB_SPLITS[split] + ".tsv")
            write_atomic(path, lambda f: f.write("".join(line + "\n" for line in lines)))
            shown = os.path.join(folder, HUB_SPLITS[split] + ".tsv")
            print(f"wrote {shown}: {len(hub[split])} examples")
        if not os.path.isdir(folder):
            os.replace(part, folder)  # the folder appears whole
            continue
        for f in os.listdir(part):  # downloaded again: file by file
            os.replace(os.path.join(part, f), os.path.join(folder, f))
        os.rmdir(part)

def fetch_missing(task_name, data_dir):
    """Write <data_dir>/<TASK> from the hub's GLUE copy when it is missing (under torchrun rank 0
    writes it; the other ranks wait for the folder)."""
    get_task(task_name)  # an unknown task: refused before anything is fetched
    folder = os.path.join(data_dir, task_name)
    if os.path.isdir(folder):
        return
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"no {task_name} data in {folder}: writing it from the hub's GLUE copy ({HUB})")
        download([task_name], data_dir)
    while not os.path.isdir(folder):
        time.sleep(1)

if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description="Write GLUE tasks from the hub's copy in the standard TSV layout.")
    p.add_argument("--download", nargs="+", required=True, metavar="TASK", help=", ".join(TASKS))
    p.add_argument("--data_dir", default="glue_data")
    a = p.parse_args()
    try:
        download(a.download, a.data_dir)
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
