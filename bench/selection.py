"""python -m bench --selection: AutoSKD's teacher selection on the bench's team and on a team of
three, with the reward audited beside the run's own."""
import json
import math
import os
import statistics

import torch

import distill
import glue_data
import model
from bench.common import HARMFUL, portable, run_all, run_argv, run_distill, share_tag, write_text
from bench.stats import gap_z, kendall_tau, phase1_rewards


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
              f"errors (of the step-by-step difference) below every kept teacher's is discarded. "
              f"It applies to {len(rule)} of {len(rows)} runs, and holds in {held} of them. (out): "
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
    """One run's selection: each teacher's evidence by bench name, and the harmful teacher's gap to
    the kept teachers in standard errors of the paired step-by-step difference (the smallest
    gap)."""
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
    """run_distill(argv), with two more rewards of every phase-1 step, from the same student, batch,
    lr and held-out examples, over the whole batch (nothing the run computes changes): the lookahead
    through the whole student, and through the output layer from a forward without dropout. Into
    <out_dir>/distribution.json under AUDITS, [steps][K] each. A killed run starts afresh, as the
    steps before its kill would be missing."""
    out_dir = distill.parse_args(argv).out_dir
    if os.path.isfile(os.path.join(out_dir, "resume.pt")):
        os.remove(os.path.join(out_dir, "resume.pt"))
    audit = {key: [] for key in AUDITS}
    h = {}
    real = distill.LookaheadReward.before

    def before(self, student, idx, step, lr, active):
        real(self, student, idx, step, lr, active)
        if all(active):  # (phase-2 plays without the discarded)
            audit_step(self, student, idx, step, lr, h, audit)

    distill.LookaheadReward.before = before
    try:
        metrics = run_distill(argv)
    finally:
        distill.LookaheadReward.before = real
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
    run, a = reward.run, reward.run.args
    if step % a.probe_every == 0 or not h:
        held, labels, _ = reward.heldout.at(step)
        h["whole_student"] = distill.heldout_grad(student, held, labels)
        h["output_no_dropout"] = distill.heldout_output_grad(student, held, labels)
    batch, i = run.batch(idx)
    rest = (run.labels[i], reward.soft[:, i])
    kd_flags = (lr, a.temperature, a.alpha, run.labelled[i])
    whole = distill.lookahead_rewards(student, batch, *rest, h["whole_student"], *kd_flags)
    with distill.dropout_off(student), torch.no_grad():
        u, z = model.features_and_logits(student, batch)
    output = distill.output_layer_rewards(u, z, *rest, h["output_no_dropout"], *kd_flags)
    audit["whole_student"].append(whole.tolist())
    audit["output_no_dropout"].append(output.tolist())
