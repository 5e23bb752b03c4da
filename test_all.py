"""Tests for the whole reference, on CPU, offline, in a few minutes.

    python -m pytest -q test_all.py

Everything is made here: a tiny vocabulary, tiny random BERT checkpoints built from a config, and
tiny TSV files in each GLUE task's published format. Pieces are pinned to independent references:
metrics to hand-worked values (and numpy), the sampler to the analytic REINFORCE term, the student's
kept layers and the cached teacher outputs to transformers' own models.
"""
import json
import math
import os
import random
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from a hub; CLI subprocesses inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest, and steady on a busy machine

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizer

import distill
import glue_data
import model
import teachers
import sampler
from sampler import TeacherSampler

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "the a cat dog man woman car house is was good bad big small red blue runs sits sees".split()

# Header lines and row writers in each task's published format; `l` is the label text.
FORMATS = {
    "CoLA": (None, lambda i, a, b, l: f"gj04\t{l}\t{'' if l == '1' else '*'}\t{a}"),
    "SST-2": ("sentence\tlabel", lambda i, a, b, l: f"{a} \t{l}"),
    "MRPC": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             lambda i, a, b, l: f"{l}\t{1000 + i}\t{2000 + i}\t{a}\t{b}"),
    "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
              lambda i, a, b, l: f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{l}"),
    "QQP": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            lambda i, a, b, l: f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{l}"),
    "MNLI": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             lambda i, a, b, l: f"{i}\t{i}\t{i}e\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{l}\t{l}"),
    "QNLI": ("index\tquestion\tsentence\tlabel", lambda i, a, b, l: f"{i}\t{a}\t{b}\t{l}"),
    "RTE": ("index\tsentence1\tsentence2\tlabel", lambda i, a, b, l: f"{i}\t{a}\t{b}\t{l}"),
    "WNLI": ("index\tsentence1\tsentence2\tlabel", lambda i, a, b, l: f"{i}\t{a}\t{b}\t{l}"),
}
# The published test files: no label, and CoLA's has a header.
TEST_FORMATS = {
    "CoLA": ("index\tsentence", lambda i, a, b: f"{i}\t{a}"), "SST-2": ("index\tsentence", lambda i, a, b: f"{i}\t{a}"),
    "MRPC": ("index\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda i, a, b: f"{i}\t{1000 + i}\t{2000 + i}\t{a}\t{b}"),
    "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
              lambda i, a, b: f"{i}\tmain-news\theadlines\t2015\t{i:04d}\tnone\tnone\t{a}\t{b}"),
    "QQP": ("id\tquestion1\tquestion2", lambda i, a, b: f"{i}\t{a}\t{b}"),
    "MNLI": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2",
             lambda i, a, b: f"{i}\t{i}\t{i}n\tslate\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}"),
    "QNLI": ("index\tquestion\tsentence", lambda i, a, b: f"{i}\t{a}\t{b}"),
    "RTE": ("index\tsentence1\tsentence2", lambda i, a, b: f"{i}\t{a}\t{b}"),
    "WNLI": ("index\tsentence1\tsentence2", lambda i, a, b: f"{i}\t{a}\t{b}"),
}
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                   "label4\tlabel5\tgold_label")


def make_rows(task, n, seed):
    """n rows whose label is learnable: it follows whether 'good' is in the first sentence."""
    rng, labels, out = random.Random(seed), glue_data.TASKS[task].labels, []
    for i in range(n):
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        y = int("good" in a.split()) if labels is None or len(labels) == 2 else rng.randrange(len(labels))
        out.append((a, b, f"{y * 4 + rng.random():.3f}" if labels is None else labels[y]))
    return out


def write_task(root, task, n_train=64, n_dev=24):
    header, fmt = FORMATS[task]
    folder = os.path.join(root, task)
    os.makedirs(folder, exist_ok=True)
    splits = {"train": n_train, **{s: n_dev for s in glue_data.TASKS[task].dev}}
    for k, (split, n) in enumerate(splits.items()):
        head = MNLI_DEV_HEADER if task == "MNLI" and split != "train" else header
        extra = 4 if head == MNLI_DEV_HEADER else 0  # MNLI dev: label1 ... label5, then gold_label
        lines = [fmt(i, *row) + ("\t" + row[2]) * extra for i, row in enumerate(make_rows(task, n, seed=k))]
        with open(os.path.join(folder, split + ".tsv"), "w", encoding="utf-8", newline="") as f:
            f.write("".join(line + "\n" for line in ([head] if head else []) + lines))
    head, fmt = TEST_FORMATS[task]
    for k, split in enumerate(["test_matched", "test_mismatched"] if task == "MNLI" else ["test"]):
        lines = [fmt(i, a, b) for i, (a, b, _) in enumerate(make_rows(task, n_dev - 3 - k, seed=10 + k))]
        open(os.path.join(folder, split + ".tsv"), "w").write("".join(line + "\n" for line in [head] + lines))
    return folder


def make_tiny_bert(folder, layers, dropout=0.1):
    """A tiny random BERT checkpoint folder with its own WordPiece vocabulary."""
    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")), layers=3)


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("glue"))
    for task in glue_data.TASKS:
        write_task(root, task)
    return root


def distil_in(argv, cwd):
    """distill.py's main() in-process, run from cwd; returns metrics.json."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        args = distill.parse_args(argv)
        distill.main(args)
        with open(os.path.join(args.out_dir, "metrics.json")) as f:
            return json.load(f)
    finally:
        os.chdir(old)


def cli(argv, cwd, env=None):
    """distill.py as a user runs it: (exit code, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "distill.py")] + argv, cwd=cwd,
                       capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    return p.returncode, p.stderr


# ------------------------------------------------------------------------------------ glue_data
METHOD = ["glue_data.py", "sampler.py", "model.py", "teachers.py", "distill.py"]  # each on those before
ONE_STORY = {("distill.py", "train")}  # the training loop reads as one block, as nanoGPT's does


def test_each_module_imports_only_those_before_it_and_keeps_the_style():
    """No import cycle: each method module imports only the ones before it in METHOD, under its own
    name; nothing calls distill.main but the command itself; lines within 100 characters, functions
    within 40 lines (but the training loop)."""
    import ast
    for k, name in enumerate(METHOD):
        source = open(os.path.join(HERE, name), encoding="utf-8").read()
        tree = ast.parse(source)
        imports = [a for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        imported = {a.name for a in imports} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        ours = {m + ".py" for m in imported} & set(METHOD)
        assert ours <= set(METHOD[:k]), (name, ours)
        renamed = [a.name for a in imports if a.asname and a.name + ".py" in METHOD]
        assert not renamed, (name, renamed)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
        assert name != "distill.py" or len(calls) == 1, [c.lineno for c in calls]  # the __main__ block's
        long_lines = [n for n, line in enumerate(source.splitlines(), 1) if len(line) > 100]
        assert not long_lines, (name, long_lines)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        long_functions = [f.name for f in functions if f.end_lineno - f.lineno + 1 > 40
                          and (name, f.name) not in ONE_STORY]
        assert not long_functions, (name, long_functions)


def project_modules():
    """Every Python file of the project: the method's modules, the bench's, the tests."""
    bench = [os.path.join("bench", f) for f in sorted(os.listdir(os.path.join(HERE, "bench")))
             if f.endswith(".py")] if os.path.isdir(os.path.join(HERE, "bench")) else []
    return METHOD + bench + ["test_all.py"]


def test_one_name_per_concept():
    """No function or class name is defined at the top of two modules, and no module of the project is
    imported under another name."""
    import ast
    where = {}
    for name in project_modules():
        tree = ast.parse(open(os.path.join(HERE, name), encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "__init__":
                where.setdefault(node.name, []).append(name)
        ours = {os.path.splitext(os.path.basename(m))[0] for m in project_modules()} | {"bench"}
        renamed = [a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for a in node.names if a.asname and a.name.split(".")[-1] in ours]
        assert not renamed, (name, renamed)
    twice = {f: m for f, m in where.items() if len(m) > 1}
    assert not twice, twice
    for name in project_modules():  # the harness keeps the method's line length too
        if name.startswith("bench") and not os.path.basename(name).startswith("test_"):
            source = open(os.path.join(HERE, name), encoding="utf-8").read()
            long_lines = [n for n, line in enumerate(source.splitlines(), 1) if len(line) > 100]
            assert not long_lines, (name, long_lines)


LOSSES = ("soft_targets", "kd_loss", "expected_error_grad")  # model.py's part of the method


def test_the_method_reads_top_down_to_the_banner_and_the_readme_counts_it():
    """distill.py: the method first and whole, at most 350 lines above the banner, none of it below
    (teaching, AutoSKD, the loop, the rewards); the README's line counts are this tree's."""
    import ast
    import re
    source = open(os.path.join(HERE, "distill.py"), encoding="utf-8").read()
    above, below = source.split("\n# " + "=" * 98 + "\n# The command: arguments")
    for piece in ("class Teaching", "def teach(", "def autoskd(", "def train(", "def lookahead_rewards(",
                  "def output_layer_rewards(", "class LookaheadReward", "class StepReward"):
        assert piece in above and piece not in below, piece
    n_distill = len(above.splitlines())
    n_sampler = len(open(os.path.join(HERE, "sampler.py"), encoding="utf-8").read().splitlines())
    tree = ast.parse(open(os.path.join(HERE, "model.py"), encoding="utf-8").read())
    n_losses = sum(f.end_lineno - f.lineno + 1 for f in tree.body if getattr(f, "name", None) in LOSSES)
    assert n_distill <= 350
    readme = " ".join(open(os.path.join(HERE, "README.md"), encoding="utf-8").read().split())
    said = re.search(r"reads (\d+) lines: `distill.py` from the top to its banner \((\d+)\), `sampler.py` "
                     r"\((\d+)\) and the losses in `model.py` \(.*?: (\d+)\)", readme)
    assert said, "the README no longer says how many lines the method takes"
    counts = [n_distill + n_sampler + n_losses, n_distill, n_sampler, n_losses]
    assert [int(x) for x in said.groups()] == counts, counts


@pytest.mark.parametrize("task", list(glue_data.TASKS))
def test_every_task_loads_its_published_format(glue_dir, task):
    data = glue_data.load_task(glue_dir, task)
    assert list(data) == ["train"] + list(glue_data.TASKS[task].dev)
    expected = make_rows(task, 64, seed=0)
    ex = data["train"]
    assert len(ex) == 64 and ex.text_a[5].rstrip() == expected[5][0]  # SST-2 keeps its trailing space
    assert (ex.text_b is None) == (task in ("CoLA", "SST-2"))
    if ex.text_b is not None:
        assert ex.text_b[5] == expected[5][1]
    labels = glue_data.TASKS[task].labels
    want = float(expected[5][2]) if labels is None else labels.index(expected[5][2])
    assert ex.labels[5] == want


def test_real_glue_files_if_present():
    root = os.path.join(HERE, "..", "shared", "glue_data")
    if not os.path.isdir(root):
        pytest.skip("no ../shared/glue_data beside the repo")
    sizes = {"RTE": (2490, 277), "MRPC": (3668, 408), "CoLA": (8551, 1043), "SST-2": (67349, 872)}
    for task, (n_train, n_dev) in sizes.items():
        data = glue_data.load_task(root, task)
        assert (len(data["train"]), len(data["dev"])) == (n_train, n_dev)
    assert glue_data.load_task(root, "MRPC")["dev"].labels.count(1) == 279  # BOM header read right


# The hub's GLUE copy as its dataset card describes it: config, text fields, class names (STS-B: a float
# score), and the label string each class has in the published TSV files.
HUB = {"CoLA": ("cola", "sentence", None, ["unacceptable", "acceptable"], ["0", "1"]),
       "SST-2": ("sst2", "sentence", None, ["negative", "positive"], ["0", "1"]),
       "MRPC": ("mrpc", "sentence1", "sentence2", ["not_equivalent", "equivalent"], ["0", "1"]),
       "STS-B": ("stsb", "sentence1", "sentence2", None, None),
       "QQP": ("qqp", "question1", "question2", ["not_duplicate", "duplicate"], ["0", "1"]),
       "MNLI": ("mnli", "premise", "hypothesis", ["entailment", "neutral", "contradiction"],
                ["entailment", "neutral", "contradiction"]),
       "QNLI": ("qnli", "question", "sentence", ["entailment", "not_entailment"], ["entailment", "not_entailment"]),
       "RTE": ("rte", "sentence1", "sentence2", ["entailment", "not_entailment"], ["entailment", "not_entailment"]),
       "WNLI": ("wnli", "sentence1", "sentence2", ["not_entailment", "entailment"], ["0", "1"])}


def hub_text(i, second=False):
    """A hub text as the hub may hold it: runs of spaces, a trailing space; the second with a tab
    and a line break, which a TSV field cannot hold."""
    return f"second\n{i}\tend" if second else f"first  {i}   with spaces "


def hub_score(i):
    return i * 0.37 % 5  # a float with every digit in use


def fake_hub(path, config):
    """A stand-in for datasets.load_dataset("nyu-mll/glue", config): {split: rows with .features}."""
    assert path == "nyu-mll/glue"
    task = next(t for t, h in HUB.items() if h[0] == config)
    _, fa, fb, names, _ = HUB[task]

    class Split(list):
        features = {"label": type("ClassLabel", (), {"names": names})() if names else object()}

    def rows(n, test=False):
        label = lambda i: -1 if test else (hub_score(i) if names is None else i % len(names))
        return Split([{"idx": i, fa: hub_text(i), "label": label(i)} | ({fb: hub_text(i, True)} if fb else {})
                      for i in range(n)])
    dev = ["validation_matched", "validation_mismatched"] if task == "MNLI" else ["validation"]
    test = ["test_matched", "test_mismatched"] if task == "MNLI" else ["test"]
    return {"train": rows(7)} | {s: rows(5) for s in dev} | {s: rows(4, test=True) for s in test}


def test_download_writes_the_published_layout(tmp_path, monkeypatch):
    """glue_data.py --download, offline: hub records become the published TSV files load_task reads,
    and read back to the hub's very texts and scores (tabs and line breaks, which a TSV field cannot
    hold, become spaces), test splits included."""
    glue_data.download(list(glue_data.TASKS), str(tmp_path), fake_hub)
    for task, (_, _, fb, names, published) in HUB.items():
        data = glue_data.load_task(str(tmp_path), task)
        test = glue_data.load_task(str(tmp_path), task, test=True)
        splits = ["train", *glue_data.TASKS[task].dev, *glue_data.test_files(task)]
        assert sorted(os.listdir(tmp_path / task)) == sorted(s + ".tsv" for s in splits)
        head = open(tmp_path / task / "train.tsv").readline().rstrip("\n")
        assert head == (FORMATS[task][0] or "").lstrip("\ufeff") or (task == "CoLA" and len(head.split("\t")) == 4)
        if task == "MNLI":
            assert open(tmp_path / task / "dev_matched.tsv").readline().rstrip("\n") == MNLI_DEV_HEADER
        for split in glue_data.test_files(task):
            assert open(tmp_path / task / f"{split}.tsv").readline().rstrip("\n") == TEST_FORMATS[task][0]
        for ex, n in [(data["train"], 7), (data[glue_data.TASKS[task].dev[0]], 5)] + [(e, 4) for e in test.values()]:
            assert ex.text_a == [hub_text(i) for i in range(n)], task
            assert fb is None or ex.text_b == [f"second {i} end" for i in range(n)], task
        for i in range(7):
            want = hub_score(i) if names is None else glue_data.TASKS[task].labels.index(published[i % len(names)])
            assert data["train"].labels[i] == want, (task, i)  # STS-B: the very float
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".download")]
    glue_data.download(["RTE"], str(tmp_path), fake_hub)  # again, over the folder there
    assert glue_data.load_task(str(tmp_path), "RTE")["train"].text_a == [hub_text(i) for i in range(7)]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(glue_data.DataError, match="needs the datasets package: pip install datasets"):
        glue_data.download(["RTE"], str(tmp_path))


@pytest.mark.parametrize("task", list(glue_data.TASKS))
def test_every_task_loads_its_published_test_format(glue_dir, task):
    test = glue_data.load_task(glue_dir, task, test=True)
    splits = ["test_matched", "test_mismatched"] if task == "MNLI" else ["test"]
    assert list(test) == splits
    for k, split in enumerate(splits):
        rows = make_rows(task, 24 - 3 - k, seed=10 + k)
        ex = test[split]
        assert len(ex) == len(rows) and ex.text_a[4] == rows[4][0] and set(ex.labels) == {None}
        assert ex.text_b is None if task in ("CoLA", "SST-2") else ex.text_b[4] == rows[4][1]
    path = os.path.join(glue_dir, task, splits[0] + ".tsv")
    good = open(path).read()
    try:
        open(path, "a").write("99\tcut short\n" if task not in ("CoLA", "SST-2") else "99\n")
        with pytest.raises(glue_data.DataError, match=rf"{splits[0]}\.tsv:{len(good.splitlines()) + 1}: expected"):
            glue_data.load_task(glue_dir, task, test=True)
    finally:
        open(path, "w").write(good)


def test_qqp_incomplete_rows_are_skipped(tmp_path):
    folder = write_task(str(tmp_path), "QQP")
    with open(os.path.join(folder, "train.tsv"), "a") as f:
        f.write("99\t1\t2\twhat is a cat\n")  # a question missing, as in the public file
    assert len(glue_data.load_task(str(tmp_path), "QQP")["train"]) == 64


def test_malformed_row_names_file_and_line(tmp_path):
    folder = write_task(str(tmp_path), "RTE")
    path = os.path.join(folder, "train.tsv")
    lines = open(path).read().splitlines()
    lines[3] = lines[3].replace("\t", " ", 1)
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(glue_data.DataError, match=r"train\.tsv:4: expected 4 tab-separated fields"):
        glue_data.load_task(str(tmp_path), "RTE")


def test_unknown_label_and_bad_score(tmp_path):
    folder = write_task(str(tmp_path), "RTE")
    path = os.path.join(folder, "dev.tsv")
    open(path, "a").write("99\ta\tb\tmaybe\n")
    with pytest.raises(glue_data.DataError, match=r"dev\.tsv:26: unknown label 'maybe'"):
        glue_data.load_task(str(tmp_path), "RTE")
    folder = write_task(str(tmp_path), "STS-B")
    open(os.path.join(folder, "train.tsv"), "a").write("\t".join(["1"] * 9 + ["high"]) + "\n")
    with pytest.raises(glue_data.DataError, match="score 'high' is not a number"):
        glue_data.load_task(str(tmp_path), "STS-B")


def test_missing_data(tmp_path):
    with pytest.raises(glue_data.DataError, match="no RTE data in"):
        glue_data.load_task(str(tmp_path), "RTE")
    folder = write_task(str(tmp_path), "RTE")
    os.remove(os.path.join(folder, "dev.tsv"))
    with pytest.raises(glue_data.DataError, match="missing data file .*dev.tsv"):
        glue_data.load_task(str(tmp_path), "RTE")
    with pytest.raises(glue_data.DataError, match="unknown task 'RTF'; GLUE tasks are"):
        glue_data.load_task(str(tmp_path), "RTF")
    with pytest.raises(glue_data.DataError, match="unknown task 'sst2'; did you mean SST-2?"):
        glue_data.load_task(str(tmp_path), "sst2")


def test_collate_pads_to_longest_in_batch(tiny_bert):
    enc = {"input_ids": [[5, 6], [5, 6, 7, 8], [9]], "attention_mask": [[1, 1], [1, 1, 1, 1], [1]]}
    batch = glue_data.collate(BertTokenizer.from_pretrained(tiny_bert), enc, [0, 2])  # [PAD] is id 0
    assert batch["input_ids"].tolist() == [[5, 6], [9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_batches_cover_every_example_once_and_pad_little():
    lengths = torch.randint(5, 120, (1000,), generator=torch.Generator().manual_seed(0))
    shuffled = glue_data.batches(lengths, 32, torch.Generator().manual_seed(1))
    assert sorted(i for b in shuffled for i in b) == list(range(1000))
    assert shuffled == glue_data.batches(lengths, 32, torch.Generator().manual_seed(1))  # seeded
    padded = sum(len(b) * int(lengths[b].max()) for b in shuffled)
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).split(32)
    assert padded < 0.7 * sum(len(b) * int(lengths[b].max()) for b in random_order)
    inference = glue_data.batches(lengths, 32)
    assert [lengths[i] for b in inference for i in b] == sorted(lengths.tolist())


# ------------------------------------------------------------------------------------ metrics
def test_metrics_against_hand_worked_values():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    assert glue_data.accuracy(pred, gold) == pytest.approx(3 / 5)
    assert glue_data.f1(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert glue_data.mcc(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert glue_data.mcc([1, 1, 1], [1, 0, 1]) == 0.0  # an empty column: defined as 0
    x, y = [1, 2, 3, 4], [2, 4, 6, 9]  # worked by hand: 11.5 / sqrt(5 * 26.75)
    assert glue_data.pearson(x, y) == pytest.approx(11.5 / math.sqrt(5 * 26.75))
    assert glue_data.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    # ties: ranks of x are [1, 2.5, 2.5, 4]; of y [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5)
    assert glue_data.ranks([1, 2, 2, 3]) == [1, 2.5, 2.5, 4]
    assert glue_data.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_compute_metrics_per_task():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert glue_data.compute_metrics("MRPC", logits, [1, 0, 0, 0]) == pytest.approx(
        {"accuracy": 0.75, "f1": 2 / 3})
    assert list(glue_data.compute_metrics("CoLA", logits, [1, 0, 0, 0])) == ["mcc"]
    scores = glue_data.compute_metrics("STS-B", torch.tensor([[1.0], [2.0], [3.5]]), [0.5, 2.5, 3.0])
    assert scores["spearman"] == pytest.approx(1.0) and scores["pearson"] < 1
    assert glue_data.score({"dev_matched": {"accuracy": 0.5}, "dev_mismatched": {"accuracy": 0.7}}) == 0.6


# ------------------------------------------------------------------------------------ sampler
def test_single_weight_update_is_the_reinforce_term():
    s = TeacherSampler(["a", "b", "c"], lr=0.5, momentum=0.8, normalize=False, seed=0)
    s.theta = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    s.update(0, 1.0)  # first reward: sets the baseline, advantage 0, nothing moves
    assert s.theta.tolist() == pytest.approx([0.2, -0.1, 0.4]) and s.baseline == 1.0
    p = torch.softmax(s.theta, 0)
    before = s.theta.clone()
    s.update(1, 3.0)
    expected = 0.5 * (3.0 - 1.0) * (1 - float(p[1]))  # lr * (r - b) * d log p_k / d theta_k
    assert (s.theta - before).tolist() == pytest.approx([0.0, expected, 0.0])
    assert s.baseline == pytest.approx(0.8 * 1.0 + 0.2 * 3.0)


def test_update_with_every_teachers_reward_uses_their_mean_under_p_as_baseline():
    s = TeacherSampler(["a", "b", "c"], lr=0.5, normalize=False, seed=0)
    s.theta = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    p, r = torch.softmax(s.theta, 0).tolist(), [1.0, 3.0, 2.0]
    s.update(1, r)  # an exact same-batch baseline: even the first step moves
    expected = 0.5 * (3.0 - sum(pj * rj for pj, rj in zip(p, r))) * (1 - p[1])
    assert (s.theta - torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)).tolist() == pytest.approx([0, expected, 0])
    s.active = [True, True, False]  # a discarded teacher's reward weighs nothing
    p = s.probs().tolist()
    before = float(s.theta[0])
    s.update(0, [1.0, 3.0, -50.0])
    assert float(s.theta[0]) - before == pytest.approx(0.5 * (1.0 - p[0] - 3.0 * p[1]) * (1 - p[0]))
    assert s.rewards[-1] == [0, [1.0, 3.0, -50.0]]


def test_normalized_update_divides_by_running_rms():
    s = TeacherSampler(["a", "b"], lr=1.0, momentum=0.9, seed=0)
    s.update(0, 2.0)
    p = torch.softmax(s.theta, 0)
    s.update(1, 5.0)  # adv 3, var 0.1 * 9, so A = 3 / sqrt(0.9)
    assert float(s.theta[1]) == pytest.approx(3 / math.sqrt(0.9) * (1 - float(p[1])))
    assert float(s.theta[0]) == 0.0


def test_sampler_learns_the_best_teacher_and_selection_keeps_it():
    s, noise = TeacherSampler(list("abcde"), lr=0.2, seed=3), torch.Generator().manual_seed(0)
    quality = [0.0, 0.3, 1.0, 0.2, -1.0]  # mean reward of a step with each teacher; c is best
    for _ in range(400):
        k = s.sample()
        s.update(k, quality[k] + float(torch.randn(1, generator=noise)))
    p = s.probs()
    assert int(p.argmax()) == 2 and float(p[2]) > 0.5
    assert int(p.argmin()) == 4  # the harmful teacher gets the lowest weight
    discarded = s.select_teachers(2)
    assert "c" in [n for n, a in zip(s.names, s.active) if a] and "e" in discarded
    kept = [i for i, a in enumerate(s.active) if a]
    assert s.probs()[kept].tolist() == pytest.approx((p[kept] / p[kept].sum()).tolist())  # pro rata
    assert float(s.probs()[4]) == 0.0 and all(s.sample() in kept for _ in range(50))
    with pytest.raises(ValueError, match="--keep 3: the team has 2"):
        s.select_teachers(3)


def test_selection_follows_the_evidence_not_an_early_lead():
    """Every teacher scored at every step; the harmful one's first 20 rewards are rigged high, then it
    scores below both helpful ones. p keeps the lead's history (it ranks the harmful teacher above
    helpful-b in some seeds); selection by the mean phase-1 advantage discards it in every seed."""
    true, lead, steps = [1.0, 0.4, -0.4], 2.5, 136  # mean reward of helpful-a, helpful-b, harmful
    p_keeps_harmful = 0
    for seed in range(10):
        s, noise = TeacherSampler(["helpful-a", "helpful-b", "harmful"], seed=seed), random.Random(seed)
        for step in range(steps):
            rewards = [m + noise.gauss(0, 1) for m in true]
            if step < 20:
                rewards[2] = lead + noise.gauss(0, 1)
            s.update(s.sample(), rewards)
        p_keeps_harmful += int(s.probs().argmin()) != 2
        assert s.select_teachers(2) == ["harmful"], seed
        evidence = s.record()["selection"]
        assert [e["n"] for e in evidence] == [steps] * 3 and [e["kept"] for e in evidence] == [True, True, False]
        values = np.array([r for _, r in s.rewards])  # [steps, K]
        assert [e["reward"] for e in evidence] == pytest.approx(values.mean(0).tolist())
        assert [e["reward_se"] for e in evidence] == pytest.approx((values.std(0, ddof=1) / steps ** 0.5).tolist())
        assert [e["p"] for e in evidence] == s.trace[steps - 1]
        assert s.select_teachers(2) == ["harmful"]  # selecting again changes nothing
    assert p_keeps_harmful > 0  # the draw history p carries, which selection must not follow


def test_selection_with_a_step_reward_reads_each_teachers_own_draws():
    """Only the drawn teacher is measured: its evidence is the mean advantage over its own draws;
    a teacher never drawn has none and ranks last."""
    s = TeacherSampler(["a", "b", "c"], seed=0)
    s.probs = lambda: torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)  # c is never drawn
    for k, r in [(0, 1.0), (1, 3.0), (0, 2.0), (1, 1.0)]:
        s.update(k, r)
    evidence = s.evidence()
    assert [e["n"] for e in evidence] == [2, 2, 0] and evidence[2]["reward"] is None
    b = [1.0, 1.0, 0.9 * 1.0 + 0.1 * 3.0, 0.9 * 1.2 + 0.1 * 2.0]  # the moving baseline before each step
    assert evidence[0]["advantage"] == pytest.approx(((1.0 - b[0]) + (2.0 - b[2])) / 2)
    assert evidence[1]["advantage"] == pytest.approx(((3.0 - b[1]) + (1.0 - b[3])) / 2)
    assert s.select_teachers(2) == ["c"]


def test_sampler_warmup_rewards_only_set_the_baseline():
    s = TeacherSampler(["a", "b"], lr=1.0, momentum=0.5, seed=0, warmup=3)
    for r in (1.0, 4.0, 2.0):
        s.update(0, r)
    assert s.theta.tolist() == [0.0, 0.0] and s.baseline == pytest.approx(0.5 * (0.5 * 1 + 0.5 * 4) + 0.5 * 2)
    s.update(1, 5.0)
    assert float(s.theta[1]) > 0 and float(s.theta[0]) == 0.0


def test_sampler_state_survives_json_and_continues_the_same_draws():
    s = TeacherSampler(list("abc"), seed=7, warmup=2)
    for _ in range(5):
        s.update(s.sample(), random.random())
    s.select_teachers(2)
    t = TeacherSampler(["x"])
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.probs().tolist() == s.probs().tolist() and t.active == s.active
    assert [t.sample() for _ in range(20)] == [s.sample() for _ in range(20)]


# ------------------------------------------------------------------------------------ model
def test_kd_loss_soft_part_and_temperature():
    torch.manual_seed(0)
    s, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    for T in (1.0, 4.0):
        assert float(model.kd_loss(s, labels, model.soft_targets(s, T), T, alpha=1.0)) == pytest.approx(0, abs=1e-6)
    t = torch.randn(4, 3)
    for T in (1.0, 3.0):  # alpha=1: T^2 * mean over the batch of sum p_t (log p_t - log p_s)
        pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
        want = T * T * float((pt * (pt.log() - ps.log())).sum(-1).mean())
        assert float(model.kd_loss(s, labels, model.soft_targets(t, T), T, alpha=1.0)) == pytest.approx(want, rel=1e-5)
    ce = float(torch.nn.functional.cross_entropy(s, labels))
    assert float(model.kd_loss(s, labels, None)) == pytest.approx(ce)
    mixed = model.kd_loss(s, labels, model.soft_targets(t, 2.0), 2.0, alpha=0.3)
    soft = float(model.kd_loss(s, labels, model.soft_targets(t, 2.0), 2.0, alpha=1.0))
    assert float(mixed) == pytest.approx(0.7 * ce + 0.3 * soft, rel=1e-5)
    r, y, tr = torch.tensor([[1.0], [2.0]]), torch.tensor([1.5, 2.5]), torch.tensor([[1.0], [3.0]])
    assert float(model.kd_loss(r, y, tr, 2.0, alpha=0.5)) == pytest.approx(0.5 * 0.25 + 0.5 * 0.5)


def test_kd_loss_on_a_transfer_example_is_the_soft_part_alone():
    """A transfer example has no label: its loss is T^2 KL (regression: the squared distance to the
    teacher), while a labelled example's mixes in the hard part; the batch's loss is their mean."""
    torch.manual_seed(0)
    s, t, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    labelled = torch.tensor([True, False, True, False])
    pt, ps = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    soft = 4 * (pt * (pt.log() - ps.log())).sum(-1)  # [B]: T^2 KL, T = 2
    hard = torch.nn.functional.cross_entropy(s, labels, reduction="none")  # [B]
    want = float(torch.where(labelled, 0.7 * hard + 0.3 * soft, soft).mean())
    got = model.kd_loss(s, labels, model.soft_targets(t, 2.0), 2.0, 0.3, labelled)
    assert float(got) == pytest.approx(want, rel=1e-5)  # float32 both ways, summed in other orders
    every = torch.ones(4, dtype=torch.bool)
    assert float(model.kd_loss(s, labels, model.soft_targets(t, 2.0), 2.0, 0.3, every)) == pytest.approx(
        float(model.kd_loss(s, labels, model.soft_targets(t, 2.0), 2.0, 0.3)), rel=1e-6)
    r, y, tr = torch.tensor([[1.0], [2.0]]), torch.tensor([1.5, 2.5]), torch.tensor([[1.0], [3.0]])
    want = (0.5 * 0.25 + 0.5 * 0.0 + 1.0) / 2  # the second example: (2 - 3)^2 alone
    assert float(model.kd_loss(r, y, tr, 2.0, 0.5, torch.tensor([True, False]))) == pytest.approx(want)


def test_expected_error_grad_against_autograd_in_float64():
    """dE/dz written out, against autograd through E = 1 - p(right label) in float64 (classes), and
    through the mean squared error (regression); in float32 it keeps its digits where autograd
    through 1 - p does not: on a confident student, right and wrong."""
    torch.manual_seed(0)
    z, y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True), torch.tensor([0, 1, 2, 2, 1, 0])
    error = 1 - torch.softmax(z, -1)[range(6), y].mean()
    assert torch.allclose(model.expected_error_grad(z.detach(), y), torch.autograd.grad(error, z)[0], rtol=1e-12)
    r, score = torch.randn(5, 1, dtype=torch.float64, requires_grad=True), torch.rand(5, dtype=torch.float64)
    want = torch.autograd.grad(((r[:, 0] - score) ** 2).mean(), r)[0]
    assert torch.allclose(model.expected_error_grad(r.detach(), score), want, rtol=1e-12)
    confident = torch.tensor([[12.0, -2.0], [-3.0, 11.0]], dtype=torch.float64)  # right, then wrong
    y = torch.tensor([0, 0])
    exact = model.expected_error_grad(confident, y)
    in_float32 = model.expected_error_grad(confident.float(), y).double()
    assert torch.allclose(in_float32, exact, rtol=1e-6, atol=0)  # float32's 24 bits, within a few roundings
    z32 = confident.float().requires_grad_()
    naive = torch.autograd.grad(1 - torch.softmax(z32, -1)[range(2), y].mean(), z32)[0].double()
    assert not torch.allclose(naive, exact, rtol=1e-3, atol=0)  # what the written-out form avoids


def test_student_keeps_the_bottom_layers(tiny_bert):
    student, tok = model.build_student(tiny_bert, ["a", "b", "c"], num_layers=2, task="MNLI")
    ref = BertModel.from_pretrained(tiny_bert)  # transformers' own load of the full checkpoint
    assert len(student.bert.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    for i in range(2):
        for (n, p), (_, q) in zip(student.bert.encoder.layer[i].named_parameters(),
                                  ref.encoder.layer[i].named_parameters()):
            assert torch.equal(p, q), n
    assert student.config.id2label == {0: "a", 1: "b", 2: "c"} and student.config.glue_task == "MNLI"
    with pytest.raises(ValueError, match="--student_layers 4: .* has 3 layers"):
        model.build_student(tiny_bert, ["a", "b"], num_layers=4)


# ------------------------------------------------------------------------------------ teachers
@pytest.fixture(scope="session")
def tiny_teacher(tiny_bert, tmp_path_factory):
    """A 2-layer teacher for RTE (random, not trained: its outputs are what matters here)."""
    folder = str(tmp_path_factory.mktemp("teacher"))
    m, tok = model.build_student(tiny_bert, glue_data.TASKS["RTE"].labels, 2, "RTE")
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_teacher_outputs_match_unbatched_transformers(tiny_teacher, glue_dir):
    data = glue_data.load_task(glue_dir, "RTE")
    ref = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    tok = BertTokenizer.from_pretrained(tiny_teacher)
    out = teachers.predict(ref, tok, data["dev"], 32, torch.device("cpu"), batch_size=5)
    for i in (0, 7, 23):
        enc = tok(data["dev"].text_a[i], data["dev"].text_b[i], return_tensors="pt")
        with torch.no_grad():
            assert torch.allclose(out[i], ref(**enc).logits[0], atol=1e-5)


def test_cache_is_reused_and_invalidated(tiny_teacher, tmp_path, monkeypatch):
    import shutil
    teacher = str(tmp_path / "t")
    shutil.copytree(tiny_teacher, teacher)
    write_task(str(tmp_path), "RTE")
    calls = []
    real = teachers.teacher_outputs
    monkeypatch.setattr(teachers, "teacher_outputs", lambda *a: calls.append(1) or real(*a))

    def load(max_len=32, transfer=None):
        data = glue_data.load_task(str(tmp_path), "RTE")
        if transfer:
            data["transfer"] = glue_data.read_split(transfer, "RTE", labelled=False)
        return teachers.load_team([teacher], "RTE", data, max_len, str(tmp_path / "c"),
                                  torch.device("cpu"))[0]

    first = load()
    assert len(calls) == 1 and first.train.shape == (64, 2) and "accuracy" in first.dev_metrics["dev"]
    assert torch.equal(load().train, first.train) and len(calls) == 1  # cache hit
    load(max_len=16)
    assert len(calls) == 2  # another max length
    with open(str(tmp_path / "RTE" / "train.tsv"), "a") as f:
        f.write("64\tthe cat\tthe dog\tentailment\n")
    assert load().train.shape == (65, 2) and len(calls) == 3  # data changed
    config = json.load(open(os.path.join(teacher, "config.json")))
    config["hidden_dropout_prob"] = 0.2
    json.dump(config, open(os.path.join(teacher, "config.json"), "w"))
    load()
    assert len(calls) == 4  # checkpoint changed
    cached = [p for p in (tmp_path / "c" / "RTE").iterdir() if p.suffix == ".pt"]
    newest = max(cached, key=os.path.getmtime)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a kill
    assert load().train.shape == (65, 2) and len(calls) == 5  # damaged file: recomputed, not trusted
    transfer = str(tmp_path / "RTE" / "test.tsv")  # a transfer set: the test file's 21 unlabelled rows
    with_transfer = load(transfer=transfer)
    assert with_transfer.train.shape == (65 + 21, 2) and len(calls) == 6
    assert torch.equal(with_transfer.train[:65], load().train) and len(calls) == 6  # train's part alone: cached
    assert torch.equal(load(transfer=transfer).train, with_transfer.train) and len(calls) == 6
    with open(transfer, "a") as f:
        f.write("21\tthe cat\tthe dog\n")
    assert load(transfer=transfer).train.shape == (65 + 22, 2) and len(calls) == 7  # transfer set changed


def test_a_write_killed_midway_leaves_the_old_file(tmp_path, monkeypatch, tiny_teacher):
    path = str(tmp_path / "metrics.json")
    glue_data.write_json(path, {"old": 1})

    def dies_midway(obj, f, **k):
        f.write('{"new": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(glue_data.json, "dump", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        glue_data.write_json(path, {"new": 2})
    assert json.load(open(path)) == {"old": 1}
    monkeypatch.undo()
    write_task(str(tmp_path), "RTE")  # the teacher cache: a kill inside torch.save leaves no cache file

    def save_dies_midway(obj, f):
        f.write(b"PK\x03")
        raise KeyboardInterrupt

    monkeypatch.setattr(teachers.torch, "save", save_dies_midway)
    with pytest.raises(KeyboardInterrupt):
        teachers.load_team([tiny_teacher], "RTE", glue_data.load_task(str(tmp_path), "RTE"), 16,
                           str(tmp_path / "c"), torch.device("cpu"))
    assert [p.suffix for p in (tmp_path / "c" / "RTE").iterdir()] == [".tmp"]


def test_teachers_in_the_hubs_label_order_and_rolled_ones(tiny_bert, tmp_path, capsys):
    """MNLI in the hub's order: a teacher fine-tuned so, with generic label names (LABEL_0, ...),
    serves as it is; one whose outputs are rolled against its label names is named in a warning
    line, with the order that fits and both training accuracies, in every strategy."""
    root, rng = str(tmp_path), random.Random(0)
    header, fmt = FORMATS["MNLI"]
    labels = glue_data.TASKS["MNLI"].labels
    for split, n in [("train", 90), ("dev_matched", 24), ("dev_mismatched", 24)]:
        rows = []
        for i in range(n):  # the label is the class of the first sentence's first word: learnable
            y = rng.randrange(3)
            a = " ".join([["good", "red", "bad"][y]] + rng.sample(WORDS[3:9], 3))
            rows.append(fmt(i, a, "a man sits", labels[y]) + ("\t" + labels[y]) * 4 * (split != "train"))
        head = header if split == "train" else MNLI_DEV_HEADER
        os.makedirs(os.path.join(root, "glue_data", "MNLI"), exist_ok=True)
        open(os.path.join(root, "glue_data", "MNLI", split + ".tsv"), "w").write("\n".join([head] + rows) + "\n")
    distil_in(["--task", "MNLI", "--strategy", "none", "--student", tiny_bert, "--student_layers", "2", "--epochs", "20",
         "--lr", "2e-3", "--batch_size", "8", "--out_dir", "hub"], root)
    config = json.load(open(os.path.join(root, "hub", "config.json")))
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(3)}
    json.dump(config, open(os.path.join(root, "hub", "config.json"), "w"))
    hub = AutoModelForSequenceClassification.from_pretrained(os.path.join(root, "hub"))
    with torch.no_grad():  # outputs read in this project's old MNLI order
        hub.classifier.weight.copy_(hub.classifier.weight.roll(1, 0))
        hub.classifier.bias.copy_(hub.classifier.bias.roll(1, 0))
    hub.save_pretrained(os.path.join(root, "rolled"))
    BertTokenizer.from_pretrained(os.path.join(root, "hub")).save_pretrained(os.path.join(root, "rolled"))
    capsys.readouterr()
    argv = ["--task", "MNLI", "--student", tiny_bert, "--student_layers", "1", "--epochs", "1", "--batch_size", "16"]
    m = distil_in(argv + ["--strategy", "single", "--teachers", "hub", "--out_dir", "runs/hub"], root)
    assert "warning" not in capsys.readouterr().out and m["teachers"]["hub"]["dev_matched"]["accuracy"] > 0.8
    for strategy in ["auto", "uniform", "skd", "single", "ensemble"]:
        team = ["rolled"] if strategy == "single" else ["hub", "rolled"]
        distil_in(argv + ["--strategy", strategy, "--teachers", *team, "--out_dir", f"runs/{strategy}"], root)
        warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith("warning:")]
        assert len(warnings) == 1 and "teacher rolled fits the training labels far better with its outputs read " \
            "as ['contradiction', 'entailment', 'neutral'] (training accuracy" in warnings[0], (strategy, warnings)


def test_teachers_that_do_not_fit_are_refused(tiny_bert, tmp_path):
    def make(labels, task, name):
        m, tok = model.build_student(tiny_bert, labels, 1, task)
        m.save_pretrained(str(tmp_path / name))
        return str(tmp_path / name)

    write_task(str(tmp_path), "RTE")
    data = glue_data.load_task(str(tmp_path), "RTE")
    cases = {make(["a", "b", "c"], "RTE", "three"): "has 3 outputs; RTE needs 2",
             make(["not_entailment", "entailment"], "RTE", "swapped"): "orders its labels",
             make(["entailment", "not_entailment"], "QNLI", "qnli"): "fine-tuned on QNLI, not RTE"}
    good = make(["entailment", "not_entailment"], "RTE", "good")
    for folder, message in cases.items():
        with pytest.raises(teachers.TeamError, match=message):
            teachers.load_team([good, folder], "RTE", data, 16, str(tmp_path / "c"),
                               torch.device("cpu"))
    assert not os.path.exists(str(tmp_path / "c")), "a teacher ran before the misfit was refused"
    os.makedirs(str(tmp_path / "empty"))
    with pytest.raises(teachers.TeamError, match="not a checkpoint folder"):
        teachers.local_folder(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------ distill.py
@pytest.fixture(scope="session")
def workdir(tiny_bert, tmp_path_factory):
    """A user's folder: glue_data/RTE and two fine-tuned teachers under teachers/RTE/."""
    root = str(tmp_path_factory.mktemp("work"))
    write_task(os.path.join(root, "glue_data"), "RTE", n_train=96, n_dev=32)
    for name, layers, seed in [("big", "3", "1"), ("small", "1", "2")]:
        m = distil_in(["--task", "RTE", "--strategy", "none", "--student", tiny_bert, "--student_layers", layers,
                 "--epochs", "2", "--lr", "1e-3", "--seed", seed, "--out_dir", f"teachers/RTE/{name}"], root)
        assert m["strategy"] == "none" and 0 <= m["dev"]["dev"]["accuracy"] <= 1
    return root


FAST = ["--task", "RTE", "--student_layers", "1", "--epochs", "1", "--batch_size", "16", "--lr", "1e-3"]


@pytest.mark.parametrize("strategy", ["auto", "uniform", "ensemble"])
def test_distill_end_to_end(workdir, strategy):
    out = f"runs/{strategy}"
    m = distil_in(FAST + ["--strategy", strategy, "--out_dir", out], workdir)
    assert m["strategy"] == strategy and set(m["teachers"]) == {"teachers/RTE/big", "teachers/RTE/small"}
    assert [h["phase"] for h in m["history"]] == (["phase1", "phase2", "final"] if strategy == "auto" else ["final"])
    dist = json.load(open(os.path.join(workdir, out, "distribution.json")))
    assert sum(dist["final"]) == pytest.approx(1.0)
    if strategy == "auto":
        assert len(dist["discarded"]) == 1 and dist["final"].count(0.0) == 1  # keep: half of 2
        assert len(dist["phase1"]) == 6 and len(dist["phase2"]) == 6  # (96 - 9 held out) / 16 steps each
        assert len(dist["rewards"]) == 12 and dist["rewards"][0][0] in (0, 1)
    student = AutoModelForSequenceClassification.from_pretrained(os.path.join(workdir, out))
    assert student.config.num_hidden_layers == 1 and student.config.glue_task == "RTE"


def tiny_bert_parameters(layers, h=16, inner=32, vocab=5 + len(WORDS), positions=64, classes=2):
    """make_tiny_bert's parameters, counted by hand: embeddings (words, positions, 2 token types,
    LayerNorm), each layer (q, k, v, o with biases, LayerNorm, the two feed-forward layers,
    LayerNorm), the pooler and the classifier."""
    embeddings = (vocab + positions + 2) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h) + 2 * h
    return embeddings + layers * layer + (h * h + h) + (h * classes + classes)


def test_every_run_ends_with_the_student_beside_its_teachers(workdir, capsys):
    """The closing table: parameters against hand counts, speeds measured, the summary computed from
    the table's own columns; metrics.json, the card and the screen hold the same lines; progress
    and the plan name what runs; a run without a team ends with no table."""
    m = distil_in(FAST + ["--out_dir", "runs/beside"], workdir)
    printed = capsys.readouterr()
    table = m["beside_the_team"]
    rows, student, summary = table["teachers"], table["student"], table["summary"]
    assert {n: r["parameters"] for n, r in rows.items()} == {
        "teachers/RTE/big": tiny_bert_parameters(3), "teachers/RTE/small": tiny_bert_parameters(1)}
    assert student["parameters"] == tiny_bert_parameters(1)  # FAST: the bottom layer
    assert all(r["examples_per_s"] > 0 for r in list(rows.values()) + [student])
    assert summary["largest"] == "teachers/RTE/big" and student["score"] == m["score"]
    best = max(rows.values(), key=lambda r: r["score"])
    assert summary["fewer_parameters"] == rows["teachers/RTE/big"]["parameters"] / student["parameters"]
    assert summary["faster"] == student["examples_per_s"] / rows["teachers/RTE/big"]["examples_per_s"]
    assert summary["score_kept"] == student["score"] / best["score"]
    assert sorted(r["selection"] for r in rows.values()) == ["discarded", "kept"]
    assert sum(r["p"] for r in rows.values()) == pytest.approx(1)
    card = open(os.path.join(workdir, "runs/beside/README.md")).read()
    assert "\n".join(table["lines"]) in card and printed.out.rstrip().endswith("\n".join(table["lines"]))
    assert f"| small | {tiny_bert_parameters(1) / 1e6:.2f}M | {rows['teachers/RTE/small']['score']:.4f} |" in card
    assert "AutoSKD: phase-1 6 steps, teacher selection, phase-2 6 steps" in printed.out
    assert "student: 1 epoch(s), 6 steps" in printed.out and "phase-1 epoch 1/1" in printed.err
    none = distil_in(FAST + ["--strategy", "none", "--student", os.path.join(workdir, "teachers/RTE/small"),
                       "--out_dir", "runs/beside-none"], workdir)
    assert none["beside_the_team"] == {} and "| model |" not in capsys.readouterr().out
    assert "| model |" not in open(os.path.join(workdir, "runs/beside-none/README.md")).read()


def test_missing_data_is_fetched_from_the_hub(workdir, tmp_path, monkeypatch, capsys):
    """No <data_dir>/<TASK>: distill.py writes it as glue_data.py --download does, then goes on."""
    import types
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_hub))
    data_dir = str(tmp_path / "fresh")
    m = distil_in(FAST + ["--strategy", "uniform", "--data_dir", data_dir, "--out_dir", "runs/fetched"], workdir)
    assert "no RTE data in " in capsys.readouterr().out and m["dev"]["dev"]["accuracy"] >= 0
    assert sorted(os.listdir(os.path.join(data_dir, "RTE"))) == ["dev.tsv", "test.tsv", "train.tsv"]


def fake_hub_home(root, names):
    """An HF_HOME whose hub cache holds a tiny checkpoint under each hub name, in the hub's own layout:
    with HF_HUB_OFFLINE=1, from_pretrained(name) loads it."""
    for k, name in enumerate(names):
        repo = os.path.join(root, "hub", "models--" + name.replace("/", "--"))
        make_tiny_bert(os.path.join(repo, "snapshots", "0" * 40), layers=2 + k % 2)
        os.makedirs(os.path.join(repo, "refs"))
        open(os.path.join(repo, "refs", "main"), "w").write("0" * 40)
    return root


def test_a_fresh_folder_to_a_distilled_student_in_one_command(tmp_path):
    """`python distill.py --task RTE` in an empty folder, offline, against a local hub: it fetches the
    data, fine-tunes the small team, distils; a second run reuses it all; a build killed midway
    resumes teacher by teacher."""
    recipe = teachers.RECIPES["small"]
    home = fake_hub_home(str(tmp_path / "hf"), [c for c, _ in recipe.teachers.values()] + [recipe.student])
    shim = tmp_path / "shim"  # datasets.load_dataset, served by the stand-in for the hub's GLUE copy
    os.makedirs(shim / "datasets")
    (shim / "datasets" / "__init__.py").write_text(f"import sys\nsys.path.insert(0, {HERE!r})\n"
                                                   "from test_all import fake_hub as load_dataset\n")
    env = dict(os.environ, HF_HOME=home, HF_HUB_OFFLINE="1", PYTHONPATH=str(shim))

    def distill_here(cwd, script=os.path.join(HERE, "distill.py")):
        os.makedirs(cwd, exist_ok=True)
        p = subprocess.run([sys.executable, script, "--task", "RTE", "--epochs", "1"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=600)
        return p.returncode, p.stdout + p.stderr

    fresh = str(tmp_path / "fresh")
    code, out = distill_here(fresh)
    assert code == 0, out[-3000:]
    assert "no RTE data in glue_data/RTE" in out and "building the small team in teachers/RTE/" in out
    names = list(recipe.teachers)
    assert all(f"fine-tune {n} epoch 4/4" in out for n in names), out[-3000:]  # progress says what runs
    assert __import__("re").search(rf"  {names[0]}: .*, lr .*, \d+ steps", out)  # the plan, with steps
    assert "AutoSKD: phase-1 " in out and "student epoch 1/1" in out and "| model | parameters |" in out
    done = {n: os.path.getmtime(os.path.join(fresh, "teachers/RTE", n, "metrics.json")) for n in names}
    student = json.load(open(os.path.join(fresh, "runs/RTE-auto-seed0/config.json")))
    assert student["base_model"] == recipe.student
    code, out = distill_here(fresh)  # again: data, teachers and their outputs are reused
    assert code == 0 and "building" not in out and "fine-tuning" not in out and "no RTE data" not in out, out
    assert done == {n: os.path.getmtime(os.path.join(fresh, "teachers/RTE", n, "metrics.json")) for n in names}
    killed = tmp_path / "killed.py"  # the build killed in its second teacher's third step
    killed.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport distill, model\nreal, calls = model.kd_loss, []\n"
                      "def loss(*a, **k):\n    calls.append(1)\n    if len(calls) == 7:\n"
                      "        raise KeyboardInterrupt\n    return real(*a, **k)\n"
                      "model.kd_loss = loss\ndistill.main(distill.parse_args())\n")
    other = str(tmp_path / "other")
    code, out = distill_here(other, str(killed))
    assert code != 0 and os.path.isfile(os.path.join(other, "teachers/RTE", names[1], "resume.pt")), out[-2000:]
    first = os.path.getmtime(os.path.join(other, "teachers/RTE", names[0], "metrics.json"))
    code, out = distill_here(other)
    assert code == 0, out[-3000:]
    assert f"fine-tuning teacher {names[1]} ({recipe.teachers[names[1]][0]}), resumed" in out
    assert f"fine-tuning teacher {names[0]}" not in out and f"fine-tuning teacher {names[2]}" in out
    assert os.path.getmtime(os.path.join(other, "teachers/RTE", names[0], "metrics.json")) == first
    assert os.path.isfile(os.path.join(other, "runs/RTE-auto-seed0/metrics.json"))


def test_a_transfer_set_is_distilled_on_and_none_ignores_it(workdir, monkeypatch, capsys):
    """Unlabelled examples in the test-file format: every phase trains on them (the reward's held-out
    examples stay labelled training examples); --strategy none has no teacher and leaves them out."""
    transfer = os.path.join(workdir, "glue_data", "RTE", "test.tsv")  # 29 rows, no labels
    trained, probed = set(), set()
    real_loss, real_probe = distill.Run.step_loss, distill.HeldOut.examples
    monkeypatch.setattr(distill.Run, "step_loss", lambda self, net, idx, soft_k, layer=None: trained.update(
        idx) or real_loss(self, net, idx, soft_k, layer))
    monkeypatch.setattr(distill.HeldOut, "examples", lambda self, step: probed.update(real_probe(self, step)) or
                        real_probe(self, step))
    m = distil_in(FAST + ["--strategy", "auto", "--transfer", transfer, "--out_dir", "runs/transfer"], workdir)
    assert trained == set(range(96 + 29)) and probed and max(probed) < 96  # labelled held-out examples
    dist = json.load(open(os.path.join(workdir, "runs/transfer/distribution.json")))
    assert len(dist["phase1"]) == math.ceil((96 - 9 + 29) / 16)  # 9 held out
    assert m["args"]["transfer"] == transfer
    trained.clear()
    distil_in(FAST + ["--strategy", "none", "--student", os.path.join(workdir, "teachers/RTE/small"), "--transfer",
                transfer, "--out_dir", "runs/none-transfer"], workdir)
    assert trained == set(range(96)) and "has no teacher to label" in capsys.readouterr().out


def test_skd_draws_from_a_fixed_distribution(workdir):
    """SKDBERT's teacher-rank (our reading): ranks 1 (worst) to K (best) by dev score, p = rank / sum;
    or the weights given, one per teacher of the sorted team."""
    m = distil_in(FAST + ["--strategy", "skd", "--out_dir", "runs/skd"], workdir)
    scores = [glue_data.score(m["teachers"][n]) for n in sorted(m["teachers"])]
    ranks = glue_data.ranks(scores)
    dist = json.load(open(os.path.join(workdir, "runs/skd/distribution.json")))
    assert dist["final"] == pytest.approx([r / sum(ranks) for r in ranks]) and "phase1" not in dist
    assert sampler.teacher_rank([0.7, 0.9, 0.8]) == pytest.approx([1 / 6, 3 / 6, 2 / 6])
    assert sampler.teacher_rank([0.7, 0.7]) == pytest.approx([0.5, 0.5])  # a tie shares the mean rank
    distil_in(FAST + ["--strategy", "skd", "--weights", "3", "1", "--out_dir", "runs/skd-weights"], workdir)
    dist = json.load(open(os.path.join(workdir, "runs/skd-weights/distribution.json")))
    assert dist["final"] == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize("task", ["RTE", "MNLI", "STS-B", "CoLA"])
def test_predict_test_writes_glue_server_files_and_a_model_card(glue_dir, tiny_bert, tmp_path, task):
    """--predict_test: one file per test split named as the GLUE server expects, `index<TAB>prediction`, one
    row per test example in file order; the output folder loads as a transformers pipeline."""
    import yaml
    from transformers import pipeline
    out = str(tmp_path / "out")
    m = distil_in(["--task", task, "--data_dir", glue_dir, "--strategy", "none", "--student", tiny_bert, "--student_layers", "1",
             "--epochs", "1", "--predict_test", "--out_dir", out], str(tmp_path))
    files = {"RTE": ["RTE.tsv"], "MNLI": ["MNLI-m.tsv", "MNLI-mm.tsv"], "STS-B": ["STS-B.tsv"], "CoLA": ["CoLA.tsv"]}[task]
    tests = glue_data.load_task(glue_dir, task, test=True)
    for name, ex in zip(files, tests.values()):
        lines = open(os.path.join(out, name)).read().splitlines()
        assert lines[0] == "index\tprediction" and [l.split("\t")[0] for l in lines[1:]] == [str(i) for i in range(len(ex))]
        labels = [l.split("\t")[1] for l in lines[1:]]
        if task == "STS-B":
            assert all(0 <= float(y) <= 5 and len(y.split(".")[1]) == 3 for y in labels)
            continue
        assert set(labels) <= set(glue_data.TASKS[task].labels)
        pipe = pipeline("text-classification", model=out)
        inputs = [{"text": a, "text_pair": b} for a, b in zip(ex.text_a, ex.text_b)] if ex.text_b else ex.text_a
        assert [r["label"] for r in pipe(inputs)] == labels  # transformers' own pipeline agrees, label names and all
    card = open(os.path.join(out, "README.md")).read()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "transformers"
    reported = [(r["dataset"]["split"], x["type"], x["value"]) for r in front["model-index"][0]["results"] for x in r["metrics"]]
    splits = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}
    assert reported == [(splits[s], k, pytest.approx(v, abs=1e-4)) for s, ms in m["dev"].items() for k, v in ms.items()]
    assert f"GLUE {task}" in card and "--strategy none" in card


def test_model_card_front_matter_survives_yaml_characters():
    """The card's front matter is YAML built by the hub's own library: a run folder named with YAML's
    special characters still parses, and the base model is left out when it is a local path."""
    import types
    import yaml
    config = types.SimpleNamespace(base_model="org/base: v1 #2", num_hidden_layers=2)
    args = distill.parse_args(["--task", "MNLI", "--out_dir", "runs/a: b #c"])
    dev = {"dev_matched": {"accuracy": 0.5}, "dev_mismatched": {"accuracy": 0.25}}
    card = model.model_card(args, types.SimpleNamespace(config=config), dev, ["t/x"], [1.0])
    front = yaml.safe_load(card.split("\n---\n")[0].removeprefix("---\n"))
    assert front["base_model"] == "org/base: v1 #2" and front["model-index"][0]["name"] == "a: b #c"
    assert [(r["dataset"]["split"], r["metrics"][0]["value"]) for r in front["model-index"][0]["results"]] == [
        ("validation_matched", 0.5), ("validation_mismatched", 0.25)]
    config.base_model = os.path.abspath("some/folder")
    card = model.model_card(args, types.SimpleNamespace(config=config), dev, [], [])
    assert "base_model" not in yaml.safe_load(card.split("\n---\n")[0].removeprefix("---\n"))

def test_single_teacher_and_seeded_repeat(workdir):
    m = distil_in(FAST + ["--strategy", "single", "--teachers", "teachers/RTE/big", "--out_dir", "runs/single"], workdir)
    assert list(m["teachers"]) == ["teachers/RTE/big"]
    runs = [distil_in(FAST + ["--seed", "5", "--out_dir", f"runs/repeat{i}"], workdir) for i in range(2)]
    dists = [open(os.path.join(workdir, f"runs/repeat{i}/distribution.json")).read() for i in range(2)]
    assert dists[0] == dists[1] and runs[0]["dev"] == runs[1]["dev"]


def test_the_order_of_the_team_decides_nothing(workdir):
    listed = distil_in(FAST + ["--seed", "5", "--teachers", "teachers/RTE/small", "teachers/RTE/big",
                         "--out_dir", "runs/listed"], workdir)
    found = distil_in(FAST + ["--seed", "5", "--out_dir", "runs/found"], workdir)  # found in teachers/RTE/: big, small
    read = lambda d: open(os.path.join(workdir, d, "distribution.json")).read()
    assert read("runs/listed") == read("runs/found") and listed["dev"] == found["dev"]


@pytest.mark.parametrize("phase", ["phase1", "phase2", "final"])
def test_a_killed_run_resumes_to_the_same_end(workdir, monkeypatch, phase):
    argv = FAST + ["--seed", "3", "--save_every", "2"]
    ref = distil_in(argv + ["--out_dir", "runs/uninterrupted"], workdir)
    current, calls, real_train, real_loss = [None], [], distill.train, model.kd_loss

    def train(run, resume, phase, *a, **k):
        current[0] = phase
        return real_train(run, resume, phase, *a, **k)

    def loss(*a, **k):  # step 3 of 6 in the phase (probes are losses too): past the step-2 checkpoint
        calls.append(current[0])
        if calls.count(phase) == (5 if phase == "final" else 8):
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(distill, "train", train)
    monkeypatch.setattr(model, "kd_loss", loss)
    out = os.path.join(workdir, f"runs/killed-{phase}")
    with pytest.raises(KeyboardInterrupt):
        distil_in(argv + ["--out_dir", f"runs/killed-{phase}"], workdir)
    assert os.path.exists(os.path.join(out, "resume.pt")) and not os.path.exists(os.path.join(out, "metrics.json"))
    monkeypatch.setattr(model, "kd_loss", real_loss)
    resumed = distil_in(argv + ["--out_dir", f"runs/killed-{phase}", "--resume"], workdir)
    assert resumed["dev"] == ref["dev"] and resumed["history"] == ref["history"]
    read = lambda d: open(os.path.join(workdir, d, "distribution.json")).read()
    assert read(f"runs/killed-{phase}") == read("runs/uninterrupted")
    a = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(os.path.join(workdir, "runs/uninterrupted")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not os.path.exists(os.path.join(out, "resume.pt"))


def test_resume_refuses_other_flags(workdir, monkeypatch):
    real, calls = model.kd_loss, []

    def loss(*a, **k):
        calls.append(1)
        if len(calls) == 12:  # past a few checkpoints of phase-1
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(model, "kd_loss", loss)
    with pytest.raises(KeyboardInterrupt):
        distil_in(FAST + ["--out_dir", "runs/flags", "--save_every", "1"], workdir)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(workdir, "runs/flags/resume.pt"))
    with pytest.raises(ValueError, match=r"written with other flags \(--lr\)"):
        distil_in(FAST[:-1] + ["2e-3", "--out_dir", "runs/flags", "--resume"], workdir)


def one_error_line(code, err, pattern):
    """A run that stopped as bad input does: non-zero, no traceback, one `error:` line matching pattern."""
    assert code != 0 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and __import__("re").search(pattern, lines[0]), err


def test_damaged_files_end_in_one_line(workdir, tmp_path):
    """A truncated resume.pt, teacher or student checkpoint: one line naming the file, nothing else touched."""
    import shutil
    out = os.path.join(workdir, "runs/damaged-resume")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "resume.pt"), "wb").write(b"PK\x03\x04 half a checkpoint")
    one_error_line(*cli(FAST + ["--out_dir", "runs/damaged-resume", "--resume"], workdir),
                   r"runs/damaged-resume/resume.pt is damaged .*: rerun without --resume to start afresh, or delete it")
    assert os.listdir(out) == ["resume.pt"]
    cut = str(tmp_path / "cut")
    shutil.copytree(os.path.join(workdir, "teachers/RTE/small"), cut)
    weights = os.path.join(cut, "model.safetensors")
    open(weights, "wb").write(open(weights, "rb").read()[:3000])  # an interrupted copy
    for extra in (["--teachers", "teachers/RTE/big", cut], ["--student", cut]):
        one_error_line(*cli(FAST + extra + ["--out_dir", "runs/damaged", "--cache_dir", "no_cache"], workdir),
                       f"{weights} is damaged .*: copy or make the checkpoint again")
        assert not os.path.exists(os.path.join(workdir, "no_cache")) and not os.path.exists(os.path.join(workdir, "runs/damaged/metrics.json"))


def test_a_full_disk_names_the_file_and_leaves_the_old_one(workdir, monkeypatch, tmp_path):
    import errno
    import transformers

    def full(obj, f, *a, **k):  # writes a little, then the disk is full
        f.write(b"PK" if "b" in f.mode else "{")
        raise OSError(errno.ENOSPC, "No space left on device")

    path = str(tmp_path / "x.pt")
    glue_data.write_atomic(path, lambda f: torch.save({"old": 1}, f), binary=True)
    with pytest.raises(OSError, match=r"could not write .*x\.pt \(\[Errno 28\] No space left on device\)"):
        glue_data.write_atomic(path, lambda f: full(None, f), binary=True)
    assert torch.load(path) == {"old": 1} and os.listdir(tmp_path) == ["x.pt"]
    out = os.path.join(workdir, "runs/full-disk")
    distil_in(FAST + ["--strategy", "ensemble", "--out_dir", "runs/full-disk"], workdir)
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("metrics.json", "model.safetensors")}
    monkeypatch.setattr(glue_data.json, "dump", full)  # metrics.json
    with pytest.raises(OSError, match=r"could not write runs/full-disk/metrics\.json \(\[Errno 28\]"):
        distil_in(FAST + ["--strategy", "ensemble", "--out_dir", "runs/full-disk", "--seed", "1"], workdir)
    assert open(os.path.join(out, "metrics.json"), "rb").read() == before["metrics.json"]
    monkeypatch.undo()
    student = open(os.path.join(out, "model.safetensors"), "rb").read()  # (the seed-1 run's, written before)

    def save_half(self, folder, **k):  # the student's weights, cut short by a full disk
        os.makedirs(folder, exist_ok=True)
        full(None, open(os.path.join(folder, "model.safetensors"), "wb"))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_half)
    with pytest.raises(OSError, match=r"could not write the student to runs/full-disk \(\[Errno 28\]"):
        distil_in(FAST + ["--strategy", "ensemble", "--out_dir", "runs/full-disk", "--seed", "2"], workdir)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == student
    assert not [f for f in os.listdir(out) if "tmp" in f]


def test_resume_of_a_finished_run_leaves_it_alone(workdir, capsys):
    out = os.path.join(workdir, "runs/finished")
    distil_in(FAST + ["--strategy", "ensemble", "--out_dir", "runs/finished"], workdir)
    stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    distil_in(FAST + ["--strategy", "ensemble", "--out_dir", "runs/finished", "--resume"], workdir)
    assert "holds a finished run" in capsys.readouterr().out
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == stamps


def test_torchrun_resumes_a_killed_run(workdir, tmp_path):
    """2 gloo ranks killed in phase-1 go on from rank 0's checkpoint and end where an uninterrupted
    torchrun run ends (dropout on: each rank's own random state must come back)."""
    argv = FAST + ["--save_every", "2"]
    # Killed at step 3's loss, after the lookahead's all_reduce, which rank 0 reaches only once it has
    # written the step-2 checkpoint (killed earlier, rank 1 may quit while rank 0 still writes).
    killed = tmp_path / "killed.py"
    killed.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport distill, model\nreal, calls = model.kd_loss, []\n"
                      "def loss(*a, **k):\n    calls.append(1)\n    if len(calls) == 9:  # phase-1 step 3's own loss\n"
                      "        raise KeyboardInterrupt\n    return real(*a, **k)\n"
                      "model.kd_loss = loss\ndistill.main(distill.parse_args())\n")

    def torchrun(script, extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               script] + argv + extra, cwd=workdir, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=600)
    assert torchrun(os.path.join(HERE, "distill.py"), ["--out_dir", "runs/tr-whole"]).returncode == 0
    assert torchrun(str(killed), ["--out_dir", "runs/tr-killed"]).returncode != 0
    out = os.path.join(workdir, "runs/tr-killed")
    assert os.path.exists(os.path.join(out, "resume.pt")) and not os.path.exists(os.path.join(out, "metrics.json"))
    p = torchrun(os.path.join(HERE, "distill.py"), ["--out_dir", "runs/tr-killed", "--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    read = lambda d, f: json.load(open(os.path.join(workdir, d, f)))
    assert read("runs/tr-killed", "metrics.json")["history"] == read("runs/tr-whole", "metrics.json")["history"]
    assert read("runs/tr-killed", "distribution.json") == read("runs/tr-whole", "distribution.json")
    a, b = (AutoModelForSequenceClassification.from_pretrained(os.path.join(workdir, d)).state_dict()
            for d in ("runs/tr-killed", "runs/tr-whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def tiny_run(tmp_path, argv, n_train):
    """A distill.Run on a synthetic RTE (the label is whether 'good' is in the first sentence) and a
    tiny student checkpoint without dropout: (trial, checkpoint folder)."""
    base = make_tiny_bert(str(tmp_path / "nodrop"), layers=2, dropout=0.0)
    write_task(str(tmp_path / "glue"), "RTE", n_train=n_train, n_dev=16)
    args = distill.parse_args(["--task", "RTE", "--data_dir", str(tmp_path / "glue"), "--out_dir", str(tmp_path / "out")] + argv)
    os.makedirs(args.out_dir, exist_ok=True)
    return distill.Run(args, glue_data.load_task(args.data_dir, "RTE"), BertTokenizer.from_pretrained(base)), base


def real_steps(trial, student, soft, idx, heldout, lr):
    """In float64, from copied weights: for every teacher j, the drop of the held-out expected error
    after a real step of size lr on j's KD loss, [K]; that error's gradient h, flat [P]; and the norm
    of each teacher's step direction |g_j|, [K]."""
    import copy
    inputs = lambda ids: trial.batch(ids)[0]
    expected_error = lambda m: 1 - torch.softmax(m(**inputs(heldout)).logits, -1)[
        range(len(heldout)), trial.labels[heldout]].mean()
    c = copy.deepcopy(student).double().eval()
    error = expected_error(c)
    h = torch.autograd.grad(error, list(c.parameters()), materialize_grads=True)
    drops, g_norms = [], []
    for soft_j in soft:
        c = copy.deepcopy(student).double().eval()
        with torch.no_grad():
            before = float(expected_error(c))
        loss = model.kd_loss(c(**inputs(idx)).logits, trial.labels[idx], soft_j[idx].double(), 2.0, 0.5)
        g = torch.autograd.grad(loss, list(c.parameters()))
        with torch.no_grad():
            for p, g_p in zip(c.parameters(), g):
                p -= lr * g_p
            after = float(expected_error(c))
        drops.append(before - after)
        g_norms.append(float(torch.cat([x.reshape(-1) for x in g]).norm()))
    return np.array(drops), torch.cat([x.reshape(-1) for x in h]), np.array(g_norms)


def test_lookahead_reward_is_the_first_order_held_out_drop(tmp_path):
    """Every teacher's value against real small steps taken in float64, on a fresh student and on one
    trained until it is confident (its softmax saturates, where float32 loses digits first)."""
    trial, base = tiny_run(tmp_path, ["--student_layers", "2"], 40)
    student = distill.new_student(trial, base, 1, 40).model
    torch.manual_seed(1)
    soft = torch.stack([model.soft_targets(torch.randn(40, 2) * 3, 2.0) for _ in range(3)])  # [K, N, C]
    heldout, idx, lr = list(range(32, 40)), list(range(8)), 1e-6
    held, batch = trial.batch(heldout)[0], trial.batch(idx)[0]

    def lookahead(h):  # the plain functions, as any loop calls them
        r = distill.lookahead_rewards(student, batch, trial.labels[idx], soft[:, idx], h, lr, 2.0, 0.5)
        return r.double().numpy()

    for trained in (False, True):
        if trained:
            opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
            for _ in range(100):
                trial.step_loss(student, list(range(32)), None)[0].backward()
                opt.step()
                opt.zero_grad()
        student.train(trained)  # either mode: the functions switch dropout off and restore the mode
        h = distill.heldout_grad(student, held, trial.labels[heldout])
        predicted = lookahead(h)
        assert student.training == trained
        # The real drop is lr <h, g_j> + O(lr^2); Richardson's step 2 d(lr) - d(2 lr) / 2 cancels the
        # lr^2 term and leaves the first-order drop the reward claims to be, up to O(lr^3).
        once, h_exact, g_norms = real_steps(trial, student, soft, idx, heldout, lr)
        twice = real_steps(trial, student, soft, idx, heldout, 2 * lr)[0]
        first_order = 2 * once - twice / 2
        # The tolerance, from float32's unit roundoff u = 2^-24 = 6e-8 and the magnitudes involved.
        # An error e in h moves lr <h, g_j> by at most lr |e| |g_j| (Cauchy-Schwarz), however small
        # the value itself: |e| is measured against float64 (h sums the held-out examples'
        # gradients, which may cancel and leave their rounding behind; its own precision is
        # test_expected_error_grad's). J h and dL_j/dz carry relative errors of a few u after the
        # layers (at most 7 u seen, over student states and CPU kernels): 100 u bounds them with
        # room. The central difference of two forwards that J h once was reached 1e5 u. A wrong
        # reward is off by the value's own size (cross-entropy for the expected error, a missing
        # lr: checked to fail).
        h_error = float((torch.cat([x.reshape(-1) for x in h]).double() - h_exact).norm())
        tol = lr * g_norms * (h_error + 100 * 2.0 ** -24 * float(h_exact.norm()))  # [K]
        assert np.all(np.abs(predicted - first_order) <= tol), (trained, predicted, first_order, tol)
        gaps = first_order[1:] - first_order[0]  # what the sampler's advantage is made of
        assert np.all(np.abs(gaps) > 10 * (tol[1:] + tol[0])), trained  # the teachers differ
        assert np.all(np.abs(predicted[1:] - predicted[0] - gaps) <= tol[1:] + tol[0]), trained
    with torch.no_grad():  # weights no input uses change nothing
        student.bert.embeddings.word_embeddings.weight[4] += 1e4  # [MASK]'s row
    assert np.array_equal(lookahead(h), predicted)


def tiny_classifier(kind, num_labels=2):
    """A tiny random sequence classifier of another head than BERT's, in float64, eval mode:
    RoBERTa (classifier.dense, tanh, classifier.out_proj) or GPT-2 (a score layer on every token,
    pooled at the last one after it)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, RobertaConfig
    from transformers import RobertaForSequenceClassification
    torch.manual_seed(0)
    if kind == "roberta":
        config = RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=70, num_labels=num_labels)
        return RobertaForSequenceClassification(config).double().eval()
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        num_labels=num_labels, pad_token_id=0)
    return GPT2ForSequenceClassification(config).double().eval()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_output_layer_reward_is_the_lookahead_through_the_output_layer(tmp_path, kind):
    """In float64: heldout_output_grad is heldout_grad's output-layer part, from a forward alone, and
    output_layer_rewards is lookahead_rewards with h zeroed outside the output layer, on BERT's head and
    on RoBERTa's (found as the last linear layer with one output per label: classifier.out_proj)."""
    if kind == "bert":
        net = AutoModelForSequenceClassification.from_pretrained(
            make_tiny_bert(str(tmp_path / "bert"), layers=2), num_labels=3).double().eval()
        name = "classifier"
    else:
        net = tiny_classifier("roberta", num_labels=3)
        name = "classifier.out_proj"
    layer = model.output_layer(net)
    assert layer is net.get_submodule(name)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: {"input_ids": torch.randint(5, 20, (n, 7), generator=g),
                     "attention_mask": torch.ones(n, 7, dtype=torch.long)}
    batch, held = ids(6), ids(5)
    labels, held_labels = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (5,), generator=g)
    soft = torch.softmax(torch.randn(4, 6, 3, generator=g, dtype=torch.float64) * 3, -1)  # [K, B, C]
    labelled = torch.tensor([True, True, False, True, False, True])
    h = distill.heldout_grad(net, held, held_labels)
    h_out = distill.heldout_output_grad(net, held, held_labels)
    params = list(net.parameters())
    ours = [k for k, p in enumerate(params) if p is layer.weight or p is layer.bias]
    assert [h[k].shape for k in ours] == [x.shape for x in h_out]
    for k, x in zip(ours, h_out):
        assert torch.allclose(x, h[k], rtol=1e-12, atol=1e-15)
    zeroed = [x if k in ours else torch.zeros_like(x) for k, x in enumerate(h)]
    u, z = model.features_and_logits(net, batch, layer)
    assert torch.equal(z, net(**batch).logits)
    for mask in (None, labelled):
        expected = distill.lookahead_rewards(net, batch, labels, soft, zeroed, 1e-3, 2.0, 0.5, mask)
        got = distill.output_layer_rewards(u, z, labels, soft, h_out, 1e-3, 2.0, 0.5, mask)
        assert got.dtype == torch.float64
        assert torch.allclose(got, expected, rtol=1e-10, atol=0), (got, expected)
        whole = distill.lookahead_rewards(net, batch, labels, soft, h, 1e-3, 2.0, 0.5, mask)
        assert not torch.allclose(got, whole, rtol=1e-3)  # the body's part is left out
    # Under bf16 autocast (a GPU run, a Trainer with bf16=True) the forward rounds to bf16, but h and
    # the reward are computed from its outputs in float32: as float64 computes them, to float32's
    # precision (in bf16 they would be 1e-2 off).
    net.float()
    with torch.autocast("cpu", torch.bfloat16):
        h_bf16 = distill.heldout_output_grad(net, held, held_labels)
        u_held, z_held = model.features_and_logits(net, held, layer)
        u, z = model.features_and_logits(net, batch, layer)
        got = distill.output_layer_rewards(u, z, labels, soft.float(), h_bf16, 1e-3, 2.0, 0.5)
    assert z.dtype == u.dtype == torch.bfloat16
    assert [x.dtype for x in h_bf16] == [torch.float32] * 2 and got.dtype == torch.float32
    dE_dz = model.expected_error_grad(z_held.double(), held_labels)  # [H, C]
    h64 = [dE_dz.T @ u_held.double(), dE_dz.sum(0)]
    exact = distill.output_layer_rewards(u.double(), z.double(), labels, soft, h64, 1e-3, 2.0, 0.5)
    assert torch.allclose(got.double(), exact, rtol=1e-4, atol=0), (got, exact)


def test_a_head_that_pools_after_its_output_layer_is_refused():
    """GPT-2's classifier scores every token, then picks the last: its output layer's output is not the
    logits, so the output-layer reward stops with one sentence naming --reward_reach student."""
    net = tiny_classifier("gpt2")
    batch = {"input_ids": torch.randint(5, 20, (3, 6))}
    with pytest.raises(ValueError, match="--reward_reach student"):
        distill.heldout_output_grad(net, batch, torch.tensor([0, 1, 0]))


def test_the_loops_output_layer_reward_comes_from_the_steps_own_forward(tmp_path, monkeypatch):
    """reach output: before() scores no pass of its own; after() turns the features of the training
    step's own forward into every teacher's reward. On a student without dropout that is the whole
    student's lookahead with h zeroed outside the output layer; --lookahead_share 0.25: the same on the
    rows where the teachers differ most, as a mean over the batch."""
    trial, base = tiny_run(tmp_path, ["--student_layers", "2"], 40)
    a = trial.args
    assert a.reward_reach == "output"  # the default
    student = distill.new_student(trial, base, 1, 40).model.train()
    torch.manual_seed(2)
    soft = torch.stack([model.soft_targets(torch.randn(40, 2) * 3, 2.0) for _ in range(3)])  # [K, N, C]
    idx, lr = list(range(31, 15, -1)), 1e-3  # rows in the batch are not the examples' indices
    reward = distill.LookaheadReward(trial, torch.arange(32, 40), soft)
    held, j = trial.batch(reward.heldout.examples(0))
    h = distill.heldout_grad(student, held, trial.labels[j])
    layer = model.output_layer(student)
    zeroed = [x if p is layer.weight or p is layer.bias else torch.zeros_like(x)
              for x, p in zip(h, student.parameters())]

    real = distill.lookahead_rewards

    def lookahead(rows):
        inputs, i = trial.batch(rows)
        return real(student, inputs, trial.labels[i], soft[:, i], zeroed, lr, a.temperature, a.alpha,
                    trial.labelled[i])

    passes = []
    monkeypatch.setattr(distill, "lookahead_rewards", lambda *x, **k: passes.append(1))
    for share in (1, 0.25):
        a.lookahead_share = share
        reward.before(student, idx, 0 if share == 1 else 1, lr, [True] * 3)
        assert reward.layer is layer
        loss, seen = trial.step_loss(student, idx, soft[0], reward.layer)
        loss.backward()  # (the step itself changes nothing of what was seen)
        got = torch.tensor(reward.after(student, 0, seen))
        rows = range(16) if share == 1 else model.where_teachers_differ(soft[:, idx], 4).tolist()
        expected = lookahead([idx[r] for r in rows]) * share
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())), share
    assert not passes  # no forward-mode pass


def test_where_teachers_differ_by_hand():
    """Two teachers that agree on every example of a batch of 6 but examples 1 and 4 (by 0.2 and 0.4):
    those two, in batch order; one: the larger difference; more than the batch: all of it."""
    q = torch.full((2, 6, 2), 0.5)  # [K, B, C]
    q[1, 4] = torch.tensor([0.9, 0.1])
    q[1, 1] = torch.tensor([0.3, 0.7])
    assert model.where_teachers_differ(q, 2).tolist() == [1, 4]
    assert model.where_teachers_differ(q, 1).tolist() == [4]
    assert model.where_teachers_differ(q, 9).tolist() == list(range(6))
    assert model.where_teachers_differ(q[:, :, :1], 2).tolist() == [1, 4]  # regression: [K, B, 1]


def test_the_lookahead_on_a_share_of_the_batch(tmp_path):
    """--lookahead_share 1: the reward is exactly the whole batch's; 0.25: the same functions on the
    quarter of the batch where the teachers in play differ most, as a mean over the whole batch."""
    trial, base = tiny_run(tmp_path, ["--student_layers", "2", "--lookahead_share", "1",
                                      "--reward_reach", "student"], 40)
    student = distill.new_student(trial, base, 1, 40).model.train()
    torch.manual_seed(2)
    soft = torch.stack([model.soft_targets(torch.randn(40, 2) * 3, 2.0) for _ in range(3)])  # [K, N, C]
    idx, lr, a = list(range(16)), 1e-3, trial.args
    reward = distill.LookaheadReward(trial, torch.arange(32, 40), soft)
    reward.before(student, idx, 0, lr, [True] * 3)
    held, i = trial.batch(reward.heldout.examples(0))
    h = distill.heldout_grad(student, held, trial.labels[i])

    def lookahead(rows):
        inputs, j = trial.batch(rows)
        return distill.lookahead_rewards(student, inputs, trial.labels[j], soft[:, j], h, lr,
                                         a.temperature, a.alpha, trial.labelled[j])

    assert reward.values == lookahead(idx).tolist()  # bit for bit
    a.lookahead_share = 0.25
    for active in ([True] * 3, [True, False, True]):  # phase-1; phase-2 with teacher 1 discarded
        reward.before(student, idx, 1, lr, active)  # (h kept: a new one every 4 steps)
        chosen = model.where_teachers_differ(soft[:, idx][torch.tensor(active)], 4).tolist()
        assert reward.values == (lookahead([idx[j] for j in chosen]) * 0.25).tolist()
    assert chosen != model.where_teachers_differ(soft[:, idx], 4).tolist()  # the active ones decide


def test_lookahead_phase1_learns_the_helpful_teacher(tmp_path):
    """One teacher gives the labels, one contradicts them: phase-1 ends with p(helpful) > 0.9, every seed."""
    for seed in (0, 1, 2):
        trial, base = tiny_run(tmp_path / str(seed), ["--student_layers", "1", "--lr", "1e-2", "--batch_size", "16",
                                                      "--phase1_epochs", "4", "--seed", str(seed)], 400)
        right = torch.nn.functional.one_hot(trial.labels, 2).float() * 4 - 2  # logit +2 on the label, -2 elsewhere
        soft = torch.stack([model.soft_targets(right, 2.0), model.soft_targets(-right, 2.0)])  # helpful, harmful
        sampler = TeacherSampler(["helpful", "harmful"], seed=seed)
        split = torch.randperm(400, generator=torch.Generator().manual_seed(seed))
        student = distill.new_student(trial, base, 4 + 1, 360)  # phase-1 and phase-2 share the schedule
        teaching = distill.Teaching(soft, sampler, learn_p=True)
        reward = distill.LookaheadReward(trial, split[:40], soft)
        distill.train(trial, distill.Resume(trial), "phase1", student, 4, split[40:], teaching, reward)
        assert float(sampler.probs()[0]) > 0.9, (seed, sampler.probs())
        values = torch.tensor([r for _, r in sampler.rewards])  # [steps, K]: every teacher, every step
        assert (values[:, 0] > values[:, 1]).float().mean() > 0.8  # the helpful teacher scores higher


def test_every_training_step_runs_with_dropout(tmp_path, monkeypatch):
    """from_pretrained gives a model in eval mode: every step of every phase must train with dropout on,
    the first epoch of a phase without a reward (final, and plain fine-tuning) included."""
    trial, base = tiny_run(tmp_path, ["--student_layers", "1", "--batch_size", "16"], 64)
    modes, real = [], distill.Run.step_loss
    monkeypatch.setattr(distill.Run, "step_loss", lambda self, net, idx, soft_k, layer=None: modes.append(
        net.training) or real(self, net, idx, soft_k, layer))
    soft = model.soft_targets(torch.randn(2, 64, 2), 2.0)
    teaching = distill.Teaching(soft, TeacherSampler(["a", "b"]))
    for phase, reward in [("final", None), ("phase1", "yes")]:
        student = distill.new_student(trial, base, 1, 64)
        idx = torch.arange(64) if reward is None else torch.arange(8, 64)
        reward = distill.LookaheadReward(trial, torch.arange(8), soft) if reward else None
        distill.train(trial, distill.Resume(trial), phase, student, 1, idx, teaching, reward)
    assert len(modes) == 4 + 4 and all(modes), modes  # 64 and 56 examples in batches of 16

def readme_block(section, tmp_path):
    """The python block of one README.md section, and its tiny setting: (code, tiny BERT folder,
    tokenizer, token ids of 160 examples, their labels [N], the held-out rows 128-159, and the logits
    [K, N, C] of three teachers: one sure of the labels, one less sure, one contradicting them)."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    code = readme.split(f"## {section}")[1].split("```python\n")[1].split("```")[0]
    base = make_tiny_bert(str(tmp_path / "bert"), layers=2)
    write_task(str(tmp_path / "glue"), "RTE", n_train=160, n_dev=8)
    train = glue_data.load_task(str(tmp_path / "glue"), "RTE")["train"]
    tokenizer = BertTokenizer.from_pretrained(base)
    enc = glue_data.encode(tokenizer, train, 64)
    labels = torch.tensor(train.labels)  # [N]
    right = torch.nn.functional.one_hot(labels, 2).float() * 4 - 2  # [N, C]: +2 on the label
    logits = torch.stack([right, right / 2, -right])  # [K, N, C]
    return code, base, tokenizer, enc, labels, list(range(128, 160)), logits


def test_the_readmes_own_loop_runs_and_discards_the_contradicting_teacher(tmp_path):
    """README.md's own-loop block, run as written on a tiny model and data; selection (keep 2)
    discards the contradicting teacher."""
    code, base, tokenizer, enc, labels, held, logits = readme_block("AutoSKD in your own loop", tmp_path)
    assert len(code.splitlines()) <= 30
    inputs = lambda idx: glue_data.collate(tokenizer, enc, idx)
    rows = [list(range(i, i + 16)) for i in range(0, 128, 16)]  # held-out examples: never a batch
    given = {"model": AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
             "batches": [(inputs(idx), labels[idx], idx) for idx in rows],
             "held": (inputs(held), labels[held]), "logits": logits}
    exec(code, given)
    sampler = given["sampler"]
    assert sampler.discarded() == ["teacher2"], sampler.evidence()
    assert len(sampler.trace) == 2 * len(rows)  # phase-1 and phase-2 each learned from every batch


def test_the_readmes_trainer_block_runs_and_discards_the_contradicting_teacher(tmp_path, monkeypatch):
    """README.md's Trainer block, run as written in one CPU process on a tiny model and data;
    selection (keep 2) discards the contradicting teacher, and the final student trains without
    moving p."""
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from transformers import DataCollatorWithPadding
    section = "AutoSKD in a transformers Trainer"
    code, base, tokenizer, enc, labels, held, logits = readme_block(section, tmp_path)
    assert len(code.splitlines()) <= 45
    rows = {name: values[:128] for name, values in enc.items()}  # the held-out rows: not in train_set
    given = {"new_model": lambda: AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
             "train_set": Dataset.from_dict(rows | {"labels": labels[:128].tolist(), "idx": list(range(128))}),
             "collator": DataCollatorWithPadding(tokenizer),
             "held": (glue_data.collate(tokenizer, enc, held), labels[held]), "logits": logits}
    monkeypatch.chdir(tmp_path)
    exec(code, given)
    sampler = given["sampler"]
    assert sampler.discarded() == ["teacher2"], sampler.evidence()
    assert len(sampler.trace) == 2 * 4  # phase-1 and phase-2 learned from each of their 4 batches
    fresh = given["new_model"]().state_dict()
    assert any(not torch.equal(w, fresh[k]) for k, w in given["final"].state_dict().items())  # it trained


def test_held_out_batches_every_rank_can_share(tmp_path):
    """Under torchrun every rank takes a share of a held-out batch: smaller ones are skipped, and a
    held-out set too small for the processes stops with one sentence naming the flags."""
    trial, _ = tiny_run(tmp_path, ["--probe_size", "4"], 32)
    trial.world = 3
    assert [len(b) for b in distill.HeldOut(trial, torch.arange(9)).batches] == [4, 4]  # the 1 left over: skipped
    trial.world = 4
    with pytest.raises(ValueError, match="held-out batches of 3 cannot be shared by 4 processes: raise --probe_size"):
        distill.HeldOut(trial, torch.arange(3))

def record_float64_rewards(monkeypatch, reach="student"):
    """From now on, every lookahead reward of an in-process run is recomputed in float64 from a copy
    of the student, independently of distill.LookaheadReward (autograd for h, torch.func.jvp for J h; reach
    output: h zeroed outside the output layer): the list returned fills with every step's [K] values."""
    import copy
    from torch.nn.attention import SDPBackend, sdpa_kernel
    record, h = [], {}
    real_before = distill.LookaheadReward.before

    def before(self, student, idx, step, lr, active):
        real_before(self, student, idx, step, lr, active)
        L = self.run
        c = copy.deepcopy(student).double().eval()
        weights = dict(c.named_parameters())
        if step % L.args.probe_every == 0 or not h:  # when the reward measures h anew
            probe = self.heldout.examples(step)
            p = torch.softmax(c(**L.batch(probe)[0]).logits, -1)
            error = 1 - p[range(len(probe)), L.labels[probe]].mean()
            h["h"] = torch.autograd.grad(error, list(weights.values()), materialize_grads=True)
            if reach == "output":  # (BERT's output layer: its classifier)
                h["h"] = tuple(g if n.startswith("classifier.") else torch.zeros_like(g)
                               for n, g in zip(weights, h["h"]))
        inputs, i = L.batch(idx)
        logits = lambda *w: torch.func.functional_call(c, dict(zip(weights, w)), kwargs=inputs).logits
        with sdpa_kernel(SDPBackend.MATH):
            z, jh = torch.func.jvp(logits, tuple(w.detach() for w in weights.values()), h["h"])
        values = []
        for soft in self.soft:
            z = z.detach().requires_grad_()
            loss = model.kd_loss(z, L.labels[i], soft[i].double(), L.args.temperature, L.args.alpha)
            values.append(lr * float((torch.autograd.grad(loss, z)[0] * jh).sum()))
        record.append(values)

    monkeypatch.setattr(distill.LookaheadReward, "before", before)
    return record


@pytest.mark.parametrize("reach", ["output", "student"])
def test_torchrun_two_cpu_processes_match_one(workdir, tmp_path, monkeypatch, reach):
    """gloo, 2 ranks: each takes half of every batch; without dropout the gradients are the same sums."""
    student = make_tiny_bert(str(tmp_path / "nodrop"), layers=3, dropout=0.0)
    # 96 examples, 8 held out: batches of 16 (88 = 5 x 16 + 8) split evenly between the ranks
    argv = FAST + ["--student", student, "--heldout", "0.0834", "--save_every", "3"]
    argv += ["--lookahead_share", "1", "--reward_reach", reach]  # as the float64 reference scores
    exact = record_float64_rewards(monkeypatch, reach)
    one = distil_in(argv + ["--out_dir", f"runs/one-process-{reach}"], workdir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(HERE, "distill.py")] + argv + ["--out_dir", f"runs/two-processes-{reach}"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.load(open(os.path.join(workdir, f"runs/two-processes-{reach}/metrics.json")))
    assert two["dev"] == one["dev"] and [h["dev"] for h in two["history"]] == [h["dev"] for h in one["history"]]
    d1, d2 = (json.load(open(os.path.join(workdir, f"runs/{r}-{reach}/distribution.json")))
              for r in ("one-process", "two-processes"))
    assert d2["discarded"] == d1["discarded"] and [k for k, _ in d2["rewards"]] == [k for k, _ in d1["rewards"]]
    # The rewards: two processes round differently from one (half batches padded to their own
    # length, sums over ranks), so they agree only as closely as float32 lets either run agree with
    # the exact value. That error is no fixed share of the value: h sums the held-out examples'
    # gradients, which cancel where the student barely tells the examples apart, while their
    # rounding stays (3e-3 of the value here). So the scale is measured: this run's own float32
    # error against float64 (the two runs differ by at most half of it, seen over CPU kernels).
    # A wrong split or average is off by the value's own size.
    every = lambda d: np.array([v for _, r in d["rewards"] for v in r])  # every teacher, every step
    float32_error = np.abs(every(d1) - np.array(exact).reshape(-1)).max()
    assert float32_error < 1e-2 * np.abs(every(d1)).max()  # small next to the values: the check bites
    assert np.abs(every(d2) - every(d1)).max() <= 10 * float32_error
    assert d2["final"] == pytest.approx(d1["final"], abs=1e-4)
    # The weights: the same sums rounded differently (1e-7 apart, seen); AdamW divides by the root
    # of the squared gradients, so a weight whose gradient is rounding noise can step by up to the
    # learning rate (1e-3) on either side: 1e-4 still tells one step's difference from none.
    a, b = (AutoModelForSequenceClassification.from_pretrained(os.path.join(workdir, f"runs/{r}-{reach}")).state_dict()
            for r in ("one-process", "two-processes"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert not [f for f in os.listdir(os.path.join(workdir, f"runs/two-processes-{reach}")) if f.startswith(".write")]


def test_regression_task_end_to_end(tiny_bert, tmp_path):
    root = str(tmp_path)
    write_task(os.path.join(root, "glue_data"), "STS-B", n_train=48, n_dev=16)
    distil_in(["--task", "STS-B", "--strategy", "none", "--student", tiny_bert, "--student_layers", "1",
         "--epochs", "1", "--out_dir", "teachers/STS-B/t"], root)
    m = distil_in(["--task", "STS-B", "--student_layers", "1", "--epochs", "1", "--batch_size", "8"], root)
    assert set(m["dev"]["dev"]) == {"pearson", "spearman"}


def test_a_nan_loss_stops_with_its_step(workdir, monkeypatch):
    real, calls = model.kd_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(model, "kd_loss", poisoned)
    with pytest.raises(FloatingPointError, match="student epoch 1 step 3: the loss is nan"):
        distil_in(FAST + ["--strategy", "ensemble", "--out_dir", "runs/nan"], workdir)


def test_command_line_errors_are_one_sentence(workdir, tmp_path):
    offline = tmp_path / "offline"  # a datasets package that cannot reach the hub
    os.makedirs(offline / "datasets")
    (offline / "datasets" / "__init__.py").write_text("def load_dataset(*a, **k):\n"
                                                      "    raise ConnectionError('no connection')\n")
    cases = [
        (["--task", "RTE"], tmp_path, "could not download RTE from the hub's GLUE copy .*no connection.*"
                                      "put the GLUE files in glue_data/RTE"),
        (["--task", "RTE", "--data_dir", os.path.join(workdir, "glue_data")], tmp_path,
         r"could not download google/bert_uncased_L-4_H-256_A-4 for the small team \(.*\): check the "
         r"connection, or pass your own team with --teachers DIR \[DIR ...\] and --student"),
        (["--task", "RTE", "--data_dir", os.path.join(workdir, "glue_data"), "--team", "nope"], tmp_path,
         "--team nope: no such recipe \\(choose small or paper\\)"),
        (["--task", "RTE", "--strategy", "single"], workdir, "--strategy single distils from one teacher"),
        (["--task", "RTE", "--keep", "0", "--cache_dir", "no_cache"], workdir, "--keep 0: the team has 2 teachers"),
        (["--task", "RTE", "--student", "no/such-model"], workdir, "--student no/such-model is neither a checkpoint folder"),
        (["--task", "RTE", "--out_dir", "glue_data/RTE/train.tsv/out", "--cache_dir", "no_cache"], workdir,
         r"--out_dir glue_data/RTE/train.tsv/out is not writable \(Not a directory\)"),
        (["--task", "RTE", "--keep", "3", "--cache_dir", "no_cache"], workdir, "--keep 3: the team has 2 teachers"),
        (["--task", "RTE", "--student_layers", "9", "--cache_dir", "no_cache"], workdir, "--student_layers 9: .* has 3"),
        (["--task", "RTE", "--strategy", "skd", "--weights", "1", "--cache_dir", "no_cache"], workdir,
         "--weights gives 1 weights for 2 teachers"),
        (["--task", "RTE", "--strategy", "skd", "--weights", "1", "-1", "--cache_dir", "no_cache"], workdir,
         "--weights 1.0 -1.0: each must be >= 0"),
        (["--task", "RTE", "--strategy", "skd", "--weights", "0", "0", "--cache_dir", "no_cache"], workdir,
         "one at least > 0"),
        (["--task", "RTE", "--weights", "1", "2", "--cache_dir", "no_cache"], workdir,
         "--weights sets --strategy skd's distribution; --strategy is auto"),
        (["--task", "RTE", "--transfer", "bad_transfer.tsv", "--cache_dir", "no_cache"], workdir,
         "bad_transfer.tsv:3: expected 3 tab-separated fields, found 2"),
    ]
    with open(os.path.join(workdir, "bad_transfer.tsv"), "w") as f:
        f.write("index\tsentence1\tsentence2\n0\ta cat\ta dog\n1\tno second sentence\n")
    for argv, cwd, message in cases:
        code, err = cli(argv, str(cwd), env={"PYTHONPATH": str(offline)})
        assert code != 0 and "Traceback" not in err, err
        assert not os.path.exists(os.path.join(str(cwd), "no_cache")), "checked only after running the teachers"
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and __import__("re").search(message, lines[0]), err
