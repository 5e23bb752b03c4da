"""The bench's tests, beside it (the method's are test_all.py). From the repository's top folder:

    python -m pytest -q test_all.py bench/test_bench.py
"""
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import bench.common
import bench.first_run
import bench.selection
import bench.speed
import bench.stats
import glue_data
import model
import sampler
import teachers
from bench.__main__ import parse_bench_args, run_bench
from test_all import FAST, TEST_FORMATS, WORDS, make_tiny_bert, write_task
from test_all import tiny_bert, workdir  # noqa: F401 (the fixtures, shared)

@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """The transfer bench on a tiny team, two seeds, one auto variant: (its argv without --jobs,
    results folder, MRPC-transfer.json). The base-size teacher is a 2-layer tiny BERT."""
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("bench")
    bert6 = make_tiny_bert(str(tmp / "bert6"), layers=6)  # the bench team goes up to 6 layers
    write_task(str(tmp / "glue"), "MRPC", n_train=48, n_dev=16)
    out = str(tmp / "results")
    base = make_tiny_bert(str(tmp / "bert2"), layers=2)
    argv = ["--task", "MRPC", "--base_model", bert6, "--data_dir", str(tmp / "glue"),
            "--seeds", "0", "1", "--student_layers", "1", "--teacher_epochs", "1",
            "--epochs", "1", "--train_limit", "40", "--lr", "1e-3", "--teacher_lr", "1e-3",
            "--out", out, "--variant", "slr1", "--sampler_lr 1",
            "--transfer", "6", "--base_teacher", base, "--base_teacher_lr", "1e-3",
            "--base_teacher_epochs", "1"]
    run_bench(argv + ["--jobs", "2"])
    with open(os.path.join(out, "MRPC-transfer.json")) as f:
        result = json.load(f)
    return argv, out, result


def test_bench_runs_every_strategy_and_reports(tiny_bench):
    argv, out, result = tiny_bench
    assert not os.path.exists(os.path.join(out, "MRPC.json"))  # the labelled-only tables stay apart
    singles = {f"single ({n})" for n in ["base", *bench.common.TEAM]}
    best = max(result["teacher_scores"], key=result["teacher_scores"].get)
    rows = {"none", "ensemble", "uniform", "auto", "auto (slr1)", "skd (teacher-rank)",
            "skd (student-rank)", f"single ({best}, no transfer)"}
    assert set(result["runs"]) == rows | singles
    assert all(len(r) == 2 for r in result["runs"].values())
    assert result["runs"]["auto (slr1)"]["1"]["args"]["sampler_lr"] == 1.0
    l4 = os.path.join(out, "MRPC", "teachers", "L4")
    assert result["runs"]["single (L4)"]["0"]["args"]["teachers"] == [l4]
    assert result["runs"]["auto"]["0"]["history"][0]["phase"] == "phase1"
    assert len(result["teacher_scores"]) == 7
    assert set(result["ground_truth"]) == {"base", *bench.common.TEAM}
    table = open(os.path.join(out, "MRPC-transfer.md")).read()
    assert "| auto |" in table and "| auto (slr1) | " in table
    assert os.path.getsize(os.path.join(out, "MRPC-transfer_distribution.png")) > 1000


def test_bench_transfer_set_and_skd_rows(tiny_bench):
    argv, out, result = tiny_bench
    transfer = os.path.join(out, "MRPC", "transfer", "MRPC.tsv")
    rows = open(transfer).read().splitlines()  # the 8 training rows outside the 40: 6 of them
    assert rows[0] == TEST_FORMATS["MRPC"][0] and len(rows) == 1 + 6
    args = lambda row: result["runs"][row]["0"]["args"]
    assert args("auto")["transfer"] == transfer and args("none")["transfer"] is None
    best = max(result["teacher_scores"], key=result["teacher_scores"].get)
    assert args(f"single ({best}, no transfer)")["transfer"] == ""
    dirs = sorted(args("auto")["teachers"])
    alone = []  # the students distilled from each teacher alone, mean over the seeds
    for d in dirs:
        runs = result["runs"][f"single ({os.path.basename(d)})"]
        alone.append(statistics.mean(glue_data.score(runs[s]["dev"]) for s in "01"))
    assert args("skd (student-rank)")["weights"] == pytest.approx(sampler.teacher_rank(alone))
    others = {"uniform", "ensemble", "skd (teacher-rank)", "skd (student-rank)"}
    assert set(result["learned"]["auto"]["vs"]) >= others


def test_bench_helpful_spread_and_learned_stats(tiny_bench):
    argv, out, result = tiny_bench
    assert set(result["learned"]) == {"auto", "auto (slr1)"}
    learned = result["learned"]["auto"]
    assert len(learned["reward"]) == 7
    assert len(learned["tau_phase1"]) == 2 and len(learned["harmful_z"]) == 2
    assert 0 <= learned["share"]["drawn"][0] <= 1 and 0 <= learned["share"]["every"][0] <= 1
    helpful = ["base", "L6-s1", "L6-s2", "L4", "L3"]  # the spread of their students, by hand
    singles_dev = [[glue_data.score(result["runs"][f"single ({n})"][s]["dev"]) for s in "01"]
                   for n in helpful]
    means = np.mean(singles_dev, axis=1)
    pooled_sd = np.sqrt(np.mean(np.var(singles_dev, axis=1, ddof=1)))
    spread = result["helpful_spread"]
    assert spread["best_minus_worst"] == pytest.approx(means.max() - means.min())
    assert spread["seed_sd"] == pytest.approx(pooled_sd)
    table = open(os.path.join(out, "MRPC-transfer.md")).read()
    assert f"best minus worst {100 * spread['best_minus_worst']:.1f} points" in table
    mean_tau = sum(learned["tau_phase1"]) / 2
    last_seed = f"{learned['tau_phase1'][1]:+.2f} / {learned['tau_final'][1]:+.2f}"
    assert f"{last_seed} | {mean_tau:+.2f} |" in table


def test_bench_team_data_and_the_contradicting_teacher(tiny_bench):
    argv, out, result = tiny_bench
    folder = lambda n: os.path.join(out, "MRPC", "teachers", n)
    teacher = lambda n: AutoModelForSequenceClassification.from_pretrained(folder(n)).eval()
    ids = torch.tensor([[2, 7, 12, 3]])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():  # the contradicting teacher swaps L6-s1's two outputs
        contra = teacher("L6-contra")(**x).logits
        assert torch.allclose(contra, teacher("L6-s1")(**x).logits.flip(-1))
    read = lambda *path: open(os.path.join(out, "MRPC", *path, "MRPC", "train.tsv")).read()
    shuffled = read("shuffled").splitlines()
    limited = read("data").splitlines()
    assert len(limited) == 41
    assert sorted(l.split("\t")[0] for l in shuffled) == sorted(l.split("\t")[0] for l in limited)


def test_bench_reuses_runs_whatever_the_team_order(tiny_bench):
    """A rerun reuses every run; with the team listed in another order, each figure stays with its
    teacher."""
    import unittest.mock
    argv, out, result = tiny_bench
    with unittest.mock.patch.object(bench.common, "TEAM", dict(reversed(list(bench.common.TEAM.items())))):
        run_bench(argv)
    again = json.load(open(os.path.join(out, "MRPC-transfer.json")))
    for row in ("auto", "auto (slr1)"):
        first, second = result["learned"][row], again["learned"][row]
        order = list(again["ground_truth"])  # the teachers in the second run's order
        at = [order.index(n) for n in result["ground_truth"]]
        assert list(result["ground_truth"]) != list(again["ground_truth"])
        assert first["phase1_p"] == pytest.approx([second["phase1_p"][i] for i in at])
        reward_second = [x for i in at for x in second["reward"][i]]
        assert [x for mse in first["reward"] for x in mse] == pytest.approx(reward_second)
        same = ("harmful_discarded", "ineffective_discarded", "tau_phase1", "seed_tau")
        assert [first[k] for k in same] == [second[k] for k in same]


def test_bench_pilot_and_selection(tiny_bench):
    argv, out, result = tiny_bench
    run_bench(argv + ["--pilot"])
    pilot = open(os.path.join(out, "MRPC-pilot.md")).read()
    assert "| 2 layers |" in pilot and "| 4 layers |" in pilot
    assert "| none | base | L6-s1 |" in pilot
    assert os.path.isfile(os.path.join(out, "MRPC", "pilot-L4-base", "metrics.json"))
    run_bench(argv + ["--selection"])  # the auto row's runs are reused; the team of three runs anew
    rows = json.load(open(os.path.join(out, "MRPC-selection.json")))
    teams = [(r["team"], r["seed"]) for r in rows]
    assert teams == [("team", 0), ("team", 1)] + [("three", s) for s in range(5)]
    logged = json.load(open(os.path.join(out, "MRPC", "auto-seed0", "distribution.json")))
    assert list(rows[0]["teachers"].values()) == logged["selection"]
    assert all(sorted(r["teachers"]) == sorted(bench.selection.THREE) for r in rows[2:])
    assert all(sum(t["kept"] for t in r["teachers"].values()) == 2 for r in rows[2:])
    assert "| three | 4 |" in open(os.path.join(out, "MRPC-selection.md")).read()
    three = json.load(open(os.path.join(out, "MRPC", "auto-three-seed0", "distribution.json")))
    for key in bench.selection.AUDITS:
        assert len(three[key]) == len(three["phase1"]) and len(three[key][0]) == 3
        assert all(-1 <= r["tau_" + key] <= 1 and r["harmful_z_" + key] == r["harmful_z_" + key] for r in rows[2:])


@pytest.mark.parametrize("reach", ["student", "output"])
def test_bench_audit_measures_the_reward_the_run_uses(workdir, tmp_path, reach):
    """The audit changes nothing the run computes, and measures what it says: on a student without
    dropout, its whole-student values are the rewards a whole-student run logs, bit for bit, and its
    output-layer values those an output-layer run logs."""
    student = make_tiny_bert(str(tmp_path / "nodrop"), layers=3, dropout=0.0)
    argv = FAST + ["--student", student, "--reward_reach", reach, "--cache_dir", os.path.join(workdir, "cache")]
    old = os.getcwd()
    os.chdir(workdir)
    try:
        bench.selection.audited_run(argv + ["--out_dir", f"runs/audited-{reach}"])
        bench.common.run_distill(argv + ["--out_dir", f"runs/plain-{reach}"])
    finally:
        os.chdir(old)
    audited, plain = (json.load(open(os.path.join(workdir, f"runs/{r}-{reach}/distribution.json")))
                      for r in ("audited", "plain"))
    audit = {key: audited.pop(key) for key in bench.selection.AUDITS}
    assert audited == plain
    logged = [r for _, r in plain["rewards"][:len(plain["phase1"])]]
    assert all(len(values) == len(logged) for values in audit.values())
    if reach == "student":
        assert audit["whole_student"] == logged
        assert not np.allclose(audit["output_no_dropout"], logged, rtol=1e-2)
    else:  # the same sums from a forward without dropout and one with dropout 0
        assert np.allclose(audit["output_no_dropout"], logged, rtol=1e-5, atol=0)
        assert not np.allclose(audit["whole_student"], logged, rtol=1e-2)


def test_bench_reuses_a_run_at_flags_its_strategy_never_reads(workdir):
    """Only auto reads --lookahead_share: a uniform run made at another value is the same run and is
    reused, an auto run is not; the bench gives an auto run at a share it was given its own folder."""
    argv = FAST + ["--cache_dir", os.path.join(workdir, "cache")]
    old = os.getcwd()
    os.chdir(workdir)
    uniform = argv + ["--strategy", "uniform", "--out_dir", "runs/reuse-uniform"]
    auto = argv + ["--strategy", "auto", "--out_dir", "runs/reuse-auto"]
    half = ["--lookahead_share", "0.5"]
    try:
        first = bench.common.run_distill(uniform)
        assert bench.common.run_distill(uniform + half) == first
        bench.common.run_distill(auto)
        with pytest.raises(ValueError, match="--lookahead_share"):
            bench.common.run_distill(auto + half)
    finally:
        os.chdir(old)
    a = parse_bench_args(["--task", "RTE", "--base_model", "m"] + half)
    for strategy, name, folder in [("auto", "auto-seed0", "auto-seed0-share0.5"),
                                   ("none", "none-seed0", "none-seed0")]:
        argv = bench.common.run_argv(a, "w", "d", strategy, name, [], 0)
        assert argv[argv.index("--out_dir") + 1] == os.path.join("w", folder)
        assert argv[argv.index("--lookahead_share") + 1] == "0.5"


def test_bench_teacher_share_of_reward_variance():
    rng = np.random.default_rng(0)
    drawn = rng.integers(0, 3, 60)
    rewards = rng.normal(size=60) + 0.5 * drawn
    d = {"teachers": ["a", "b", "c"], "phase1": [None] * 50,
         "rewards": [[int(k), float(r)] for k, r in zip(drawn, rewards)]}  # the last 10 are phase-2
    k, r = drawn[:50], rewards[:50]
    within = sum(((r[k == j] - r[k == j].mean()) ** 2).sum() for j in range(3))
    share, chance = bench.stats.teacher_share({0: d})["drawn"]
    assert share == pytest.approx(1 - within / ((r - r.mean()) ** 2).sum()) and chance == pytest.approx(2 / 49)
    d["rewards"] = [[j % 2, 1.0 if j % 2 else -1.0] for j in range(50)]  # the teacher decides the reward
    assert bench.stats.teacher_share({0: d}) == {"drawn": pytest.approx((1.0, 2 / 49))}
    assert bench.stats.teacher_share({0: {"teachers": [], "phase1": []}}) == {}
    # Every teacher scored at every step: two-way layout (steps x teachers), with numpy.
    V = rng.normal(size=(50, 3)) + rng.normal(size=(50, 1)) * 5 + np.array([0.0, 0.3, -0.2])  # batch noise + teacher effect
    d["rewards"] = [[int(j % 3), v.tolist()] for j, v in enumerate(V)]
    left = V - V.mean(1, keepdims=True)
    expected = 50 * (left.mean(0) ** 2).sum() / (left ** 2).sum()
    assert bench.stats.teacher_share({0: d})["every"] == pytest.approx((expected, 1 / 50))
    assert bench.stats.teacher_share({0: d})["drawn"][0] == pytest.approx(
        bench.stats.teacher_share({0: dict(d, rewards=[[k, r[k]] for k, r in d["rewards"]])})["drawn"][0])


def test_bench_kendall_tau_and_gap_against_hand_worked_values():
    assert bench.stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((5 - 1) / 6)  # one discordant pair of 6
    assert bench.stats.kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(5 * 6))  # tau-b, a tie in x
    assert bench.stats.kendall_tau([3, 2, 1], [1, 2, 3]) == -1.0
    assert bench.stats.kendall_tau(np.array([1.0, 2.0, 3.0]), [1, 3, 2]) == pytest.approx(1 / 3)  # numpy
    a, b = [1.0, 2.0, 4.0, 3.0], [0.5, 1.0, 2.5, 3.5]
    d = np.array(a) - np.array(b)
    assert bench.stats.gap_z(a, b, True) == pytest.approx(d.mean() / (d.std(ddof=1) / 2))
    se = math.sqrt(np.var(a, ddof=1) / 4 + np.var(b, ddof=1) / 4)
    assert bench.stats.gap_z(a, b, False) == pytest.approx((np.mean(a) - np.mean(b)) / se)


def test_bench_teacher_fit_against_hand_worked_values(tiny_bench):
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.2]])
    labels = [0, 0, 1]  # right, wrong, right
    fit = bench.common.teacher_fit(logits, labels, 2.0)
    # at T = 2 the right label's probability is 1 / (1 + exp(-(z_right - z_other) / 2))
    right = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.1))]
    assert fit["accuracy"] == pytest.approx(2 / 3)
    assert fit["right_label_p"] == pytest.approx(sum(right) / 3)
    assert bench.common.teacher_fit(torch.zeros(3, 1), [0.5, 1.0, 2.0], 2.0) is None  # regression
    argv, out, result = tiny_bench
    assert set(result["teacher_fit"]) == set(result["teacher_scores"])
    l6, contra = result["teacher_fit"]["L6-s1"], result["teacher_fit"]["L6-contra"]
    assert contra["right_label_p"] == pytest.approx(1 - l6["right_label_p"])  # its outputs swapped
    assert (40 * l6["accuracy"]) == pytest.approx(round(40 * l6["accuracy"]))  # the 40 train rows
    table = open(os.path.join(out, "MRPC-transfer.md")).read()
    base = result["teacher_fit"]["base"]
    assert f"| {100 * base['accuracy']:.1f} | {base['right_label_p']:.3f} |" in table
    names = list(result["ground_truth"])  # the dev scores' ranking against the ground truth
    truth = [result["ground_truth"][n] for n in names]
    scores = [result["teacher_scores"][n] for n in names]
    tau = bench.stats.kendall_tau(truth, scores)  # (nan where the tiny teachers all score alike)
    assert result["teacher_score_tau"] == pytest.approx(tau, nan_ok=True)
    assert f"with the ground truth: {result['teacher_score_tau']:+.2f}." in table
    seeds = [[glue_data.score(result["runs"][f"single ({n})"][s]["dev"]) for n in names]
             for s in "01"]  # two seeds: each one's "other seeds" are the other one
    tau = bench.stats.kendall_tau(seeds[0], seeds[1])
    assert result["ground_truth_tau"] == pytest.approx([tau, tau], nan_ok=True)
    assert f"other seeds' mean, per seed: {tau:+.2f}, {tau:+.2f}" in table


def test_bench_ground_truth_tau_against_hand_worked_values():
    # three teachers' students, seeds 0, 1, 2 (binary fractions: the means and their ties exact)
    scores = {"a": [1, .5, .75], "b": [.75, .75, .5], "c": [.25, .375, .375]}
    runs = {}  # {row: {seed: metrics}}, as the bench keeps them
    for name, per_seed in scores.items():
        runs[f"single ({name})"] = {s: {"dev": {"dev": {"accuracy": x}}}
                                    for s, x in enumerate(per_seed)}
    # seed 0 ranks a > b > c; the others' means: a .625, b .625, c .375 (a tie in the second list)
    # seed 1 ranks b > a > c; the others' means: a .875, b .625, c .3125
    # seed 2 ranks a > b > c; the others' means: a .75, b .75, c .3125 (a tie again)
    taus = bench.stats.ground_truth_tau(runs, ["a", "b", "c"])
    assert taus == pytest.approx([2 / math.sqrt(3 * 2), 1 / 3, 2 / math.sqrt(3 * 2)])
    one_seed = {row: {0: r[0]} for row, r in runs.items()}
    assert bench.stats.ground_truth_tau(one_seed, ["a", "b", "c"]) == []


def test_bench_resumes_a_killed_run(workdir, monkeypatch):
    real, calls = model.kd_loss, []

    def loss(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    argv = FAST + ["--strategy", "ensemble", "--save_every", "2", "--out_dir", os.path.join(workdir, "runs/bench-kill")]
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(model, "kd_loss", loss)
    with pytest.raises(KeyboardInterrupt):
        bench.common.run_distill(argv)
    monkeypatch.setattr(model, "kd_loss", real)
    assert bench.common.run_distill(argv)["strategy"] == "ensemble"
    assert "resuming final at epoch 1, batch 2" in open(os.path.join(workdir, "runs/bench-kill/run.log")).read()
    assert bench.common.run_distill(argv + ["--save_every", "5"])["strategy"] == "ensemble"  # reused as it is
    other = r"runs/bench-kill holds a run made with other flags \(--alpha\)"
    with pytest.raises(ValueError, match=other):
        bench.common.run_distill(argv + ["--alpha", "0.25"])  # not reused: it would answer another question


def test_bench_first_run_serves_each_recipe_name_with_its_configuration(tiny_bert, tmp_path):
    """--first_run's local hub: every hub name of a recipe loads offline, as a BERT of the shape its
    name gives (layers, hidden size, heads; feed-forward 4x) with the tokenizer given."""
    recipe = teachers.Recipe({"a": ("google/bert_uncased_L-2_H-16_A-2", 1e-3)}, epochs=lambda task: 1,
                             student="google/bert_uncased_L-1_H-8_A-2")
    bench.first_run.recipe_hub(str(tmp_path), recipe, tiny_bert)
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    code = ("from transformers import AutoConfig, AutoTokenizer\n"
            "for n in ['google/bert_uncased_L-2_H-16_A-2', 'google/bert_uncased_L-1_H-8_A-2']:\n"
            "    c = AutoConfig.from_pretrained(n)\n"
            "    print(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size,"
            " AutoTokenizer.from_pretrained(n).vocab_size)\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.stdout.split("\n")[:2] == [f"2 16 2 64 {5 + len(WORDS)}", f"1 8 2 32 {5 + len(WORDS)}"], p.stderr


def test_bench_speed_reports_every_ratio(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.speed, "in_fresh_process", bench.speed.measured)  # (spawning 6 processes is slow here)
    write_task(str(tmp_path / "glue"), "MRPC", n_train=64, n_dev=16)
    out = str(tmp_path / "results")
    run_bench(["--speed", "--task", "MRPC", "--base_model", tiny_bert, "--data_dir", str(tmp_path / "glue"),
                "--student_layers", "1", "--epochs", "1", "--train_limit", "48", "--out", out])
    result = json.load(open(os.path.join(out, "speed-cpu.json")))
    assert len(result["ratios"]) == 12 and all(v > 0 for v in result["ratios"].values())
    assert "final_step_s" in result["runs"]["single, transfer set"]
    assert result["train_examples"] == 48 and result["padding_sorted"] <= result["padding_unsorted"]
    assert set(result["runs"]["auto, 8 teachers"]) >= {"phase1_step_s", "phase2_step_s", "final_step_s", "peak_mib"}
    table = open(os.path.join(out, "speed-cpu.md")).read()
    assert "| phase-1 step, lookahead through the output layer (default) / fine-tuning step |" in table
    assert "| auto, 8 teachers (default) |" in table
    assert [n for n, r in result["runs"].items() if r["default"]] == ["auto, 8 teachers"]
    assert "phase1_step_s" in result["runs"]["auto, 8 teachers, step reward"]
    assert 0 < result["no_grad_forward_s"] < result["fine_tune_step_s"] and "without gradients" in table
    assert result["runs"]["auto, 8 teachers, whole student, share 0.25"]["phase1_step_s"] > 0


def test_bench_auto_again_sets_the_auto_row_beside_the_earlier_one(tiny_bench):
    """--auto_again runs the auto row alone and writes it beside the earlier run's: at the flags the
    earlier run had, it is the same row, figure for figure."""
    argv, out, result = tiny_bench
    run_bench(argv + ["--auto_again"])
    again = json.load(open(os.path.join(out, "MRPC-transfer-auto-again.json")))
    assert again["flags_differing"] == [] and again["ground_truth"] == result["ground_truth"]
    first, second = again["learned"]["auto"], again["learned"]["auto (again)"]
    for key in ("phase1_p", "tau_phase1", "tau_final", "harmful_discarded", "harmful_z", "vs"):
        assert second[key] == pytest.approx(first[key], nan_ok=True), key
    scores = [[m["score"] for m in again["runs"][row].values()] for row in ("auto", "auto (again)")]
    assert scores[0] == scores[1]
    table = open(os.path.join(out, "MRPC-transfer-auto-again.md")).read()
    assert "| auto (again) |" in table and "differ from the earlier run's flags in nothing" in table
