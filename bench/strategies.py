"""The strategy bench: every strategy on the same team, student and budget, and its tables
(python -m bench --task MRPC ...; see bench/__main__.py)."""
import argparse
import json
import os
import shlex
import statistics
import time

import distill
import glue_data
import sampler
from bench.common import HARMFUL, INEFFECTIVE, portable, run_all, run_argv, share_tag, write_text
from bench.stats import (ground_truth_tau, helpful_spread, kendall_tau, learned_stats, mean_sd,
                         read_dists, seed_scores)


def compare_strategies(a, members, work, data_dir, dirs, team, scores, fit, t0):
    """Every strategy and seed on the team, the same student and budget; the tables."""
    rows = bench_rows(a, members, dirs, scores)
    auto_first = sorted(rows.items(), key=lambda r: r[1][0] != "auto")  # the longest runs first
    argvs = {}
    for seed in a.seeds:
        for row, (strategy, prefix, teacher_dirs, extra) in auto_first:
            name = f"{prefix}-seed{seed}"
            argv = run_argv(a, work, data_dir, strategy, name, teacher_dirs, seed)
            argvs[row, seed] = argv + extra
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


def auto_again(a, members, work, data_dir, dirs, t0):
    """The auto row alone, three runs at distill.py's defaults, beside the auto row of an earlier
    run of the full bench (results/<TASK>[-transfer].json), whose ground truth and other rows
    stand. Writes results/<TASK>[-transfer]-auto-again.{json,md}."""
    name = a.task + ("-transfer" if a.transfer else "")
    path = os.path.join(a.out, name + ".json")
    if a.lookahead_share is not None:
        raise ValueError("--auto_again runs auto at distill.py's defaults: drop --lookahead_share")
    if not os.path.isfile(path):
        raise ValueError(f"--auto_again sets the auto row beside an earlier run's, and {path} is "
                         f"missing: run the full bench first (the same command without it)")
    with open(path) as f:
        earlier = json.load(f)
    names = list(earlier["ground_truth"])  # the earlier tables' order, which the new row keeps
    if set(names) != set(members) or earlier["seeds"] != a.seeds or "auto" not in earlier["runs"]:
        raise ValueError(f"{path} holds another team, other seeds ({earlier['seeds']}) or no auto "
                         f"row: run the full bench")
    kinds = team_kinds(members, names)
    again = "auto (again)"
    argvs = {}
    for seed in a.seeds:
        argvs[again, seed] = run_argv(a, work, data_dir, "auto", f"auto-again-seed{seed}", dirs,
                                      seed)
    done = run_all(a.jobs, argvs, t0)
    others = list(earlier["learned"]["auto"]["vs"])  # the rows auto was set against
    runs = {row: earlier["runs"][row] for row in ["auto"] + others}
    runs[again] = {str(seed): done[again, seed] for seed in a.seeds}
    truth = earlier["ground_truth"]
    dists = read_dists(work, "auto-again", a.seeds)
    learned = {"auto": earlier["learned"]["auto"],
               again: learned_stats(dists, names, truth, kinds)}
    learned[again]["vs"] = score_gaps(runs, again, others)
    first = str(a.seeds[0])
    before, now = runs["auto"][first]["args"], runs[again][first]["args"]
    flags = distill.differing_flags(before, now, distill.FREE_FLAGS + ("out_dir",))
    result = {"earlier": name + ".json", "ground_truth": truth, "runs": runs, "learned": learned,
              "flags_differing": flags}
    out = os.path.join(a.out, f"{name}-auto-again")
    write_text(out + ".json", portable(json.dumps(result, indent=1)))
    lines = strategy_table(a, {row: runs[row] for row in ("auto", again)})
    lines += learned_tables(names, kinds, learned, len(a.seeds))
    changed = ", ".join(f"--{k} {now.get(k)} (earlier: {before.get(k, 'no such flag')})"
                        for k in flags)
    lines += ["", f"auto: the row of {name}.md. {again}: the same team, data and seeds at today's "
              f"defaults, which differ from the earlier run's flags in {changed or 'nothing'}."]
    write_text(out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


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


def team_kinds(members, names):
    """The team's names by what they learn from: {labels, HARMFUL, INEFFECTIVE: [name]}."""
    return {kind: [n for n in names if members[n][2] == kind]
            for kind in ("labels", HARMFUL, INEFFECTIVE)}


def score_gaps(runs, row, others):
    """{other row: row's dev score minus the other's, per seed}."""
    mine = seed_scores(runs, row)
    return {other: [x - y for x, y in zip(mine, seed_scores(runs, other))] for other in others}


def report(a, members, work, runs, autos, scores, fit, seconds, run_s):
    """results/<TASK>.json and .md, and the picture of the learned distribution."""
    names = list(members)
    kinds = team_kinds(members, names)
    helpful = kinds["labels"]
    # the ground truth: the student's dev score distilled from each teacher alone, mean over seeds
    truth = {n: statistics.mean(seed_scores(runs, f"single ({n})")) for n in names}
    best = f"single ({max(helpful, key=lambda n: truth[n])})"  # the best by the ground truth
    others = ("uniform", "ensemble", "skd (teacher-rank)", "skd (student-rank)", best)
    learned = {}
    auto_dists = {}
    for row, prefix in autos.items():  # what phase-1, selection and the rewards did
        dists = read_dists(work, prefix, a.seeds, share_tag(a))
        auto_dists[row] = dists
        learned[row] = learned_stats(dists, names, truth, kinds)
        learned[row]["vs"] = score_gaps(runs, row, [r for r in others if r in runs])
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


def plot(dists, path, task):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(dists), figsize=(5 * len(dists), 3.6), squeeze=False,
                             sharey=True)
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
