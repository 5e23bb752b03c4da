"""The statistics the bench reports: seed means, Kendall's tau, standard-error gaps, the
teachers' share of the reward's variance."""
import json
import math
import os
import statistics

import glue_data
from bench.common import HARMFUL, INEFFECTIVE


def read_dists(work, prefix, seeds, tag=""):
    """{seed: distribution.json} of an auto row's runs (tag: their folders' --lookahead_share
    tag)."""
    dists = {}
    for seed in seeds:
        with open(os.path.join(work, f"{prefix}-seed{seed}{tag}", "distribution.json")) as f:
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
    """Each teacher's phase-1 rewards in one run: ({name: [reward]}, paired). paired: every teacher
    was scored at every step, so the lists line up step by step; otherwise each list holds the
    steps that drew it."""
    at = {os.path.basename(t): i for i, t in enumerate(d["teachers"])}
    logged = d.get("rewards", [])[:len(d["phase1"])]
    if logged and isinstance(logged[0][1], list):
        return {n: [r[at[n]] for _, r in logged] for n in names}, True
    return {n: [r for k, r in logged if k == at[n]] for n in names}, False


def gap_z(a, b, paired):
    """(mean(a) - mean(b)) / the standard error of that difference: of the step-by-step differences
    when paired, else of two independent means."""
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
    """Kendall's tau-b of two lists of scores: (concordant - discordant pairs) / sqrt(pairs untied
    in x * pairs untied in y)."""
    pairs = [(x[i] - x[j], y[i] - y[j]) for i in range(len(x)) for j in range(i)]
    s = sum(int(d > 0) - int(d < 0) for d in (a * b for a, b in pairs))  # (numpy bools: int)
    nx = sum(a != 0 for a, _ in pairs)  # pairs untied in x
    ny = sum(b != 0 for _, b in pairs)
    return s / math.sqrt(nx * ny) if nx and ny else math.nan


def teacher_share(dists):
    """How much of the phase-1 reward the teacher explains, means over seeds, each with what chance
    alone gives: {"drawn": (share, chance)}, and for rewards that score every teacher at every step,
    "every": (share, chance).

    drawn: the drawn teacher's reward at each step, grouped by teacher: the between-teacher sum of
    squares over the total (eta squared); chance (K-1)/(n-1) for K teachers and n steps.
    every: each step's rewards minus that step's mean over the teachers (what the batch adds to
    all), then the between-teacher sum of squares over the total of what is left; chance 1/n.
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
