"""The learnable categorical distribution over the teacher team (depends on torch only).

Paper: at every step AutoSKDBERT samples ONE teacher k ~ Categorical(p) with p = softmax(theta),
and learns theta in two phases:
  phase-1   learn the weights of the whole team, separating effective from ineffective teachers;
  select    teacher selection: keep the effective teachers, discard the others and hand their
            weight to the kept ones;
  phase-2   refine the weights of the kept teachers.
"Stochastic single-weight optimization": only the weight of the sampled teacher moves. We drive it
with REINFORCE: for reward r of a step taken with teacher k, d log p_k / d theta_k = 1 - p_k, so

    theta_k <- theta_k + lr * A * (1 - p_k),       A = (r_k - b) / s

where b is the baseline and s a moving root-mean-square of (r_k - b). When every teacher j is
scored on the step's own batch (distill.py's lookahead reward), b = sum_j p_j r_j, the reward
expected under p on that batch: what the batch adds to every teacher cancels. When only the
drawn teacher is measured, b is a moving average of past rewards. The full REINFORCE gradient
would also move every other theta_j by -lr * A * p_j; the single-weight strategy drops those
terms. Dividing by s (our variant; normalize=False turns it off) frees lr from the reward's units,
which shrink as the student learns. With warmup=W, the first W rewards only set b and s.

Selection rule (select_teachers): keep the `keep` teachers with the highest mean phase-1 advantage,
not the highest p. With single-weight updates theta_k moves only when k is drawn, so among the
teachers behind the leader p keeps the order in which they fell behind and the luck of the draws:
a harmful teacher that drew an early lead can end phase-1 above a helpful one it is measurably
worse than. The evidence has no such history:
  - every teacher scored at every step (the lookahead reward): the mean over all phase-1 steps of
    r_j - b, the same steps and batches for every teacher (it ranks as the mean reward does, b
    being the same for all at a step);
  - the drawn teacher alone (a measured step reward): the mean of r_k - b over k's own draws, b the
    moving average, so that rewards shrinking as the student learns do not favour whoever was
    drawn early. A teacher never drawn has no evidence and ranks last.
A discarded teacher's theta is masked to -inf, so the softmax over the kept ones hands out the
discarded mass in proportion to the kept teachers' own weights: p'_k = p_k / sum_{kept} p_j.
"""
import math

import torch

def check_keep(keep, n):
    if not 1 <= keep <= n:
        raise ValueError(f"--keep {keep}: the team has {n} teachers (choose 1 to {n})")

def check_skd_weights(weights, names, strategy="skd"):
    """--weights, SKDBERT's fixed p (None: none given): one non-negative weight per teacher, not all
    zero, and only with --strategy skd."""
    if weights is None:
        return
    if strategy != "skd":
        raise ValueError(f"--weights sets --strategy skd's distribution; --strategy is {strategy}")
    if len(weights) != len(names):
        raise ValueError(f"--weights gives {len(weights)} weights for {len(names)} teachers "
                         f"(in this order: {', '.join(names)})")
    if min(weights) < 0 or max(weights) == 0:
        raise ValueError(f"--weights {' '.join(map(str, weights))}: each must be >= 0, "
                         f"and one at least > 0")

def teacher_rank(scores):
    """SKDBERT's fixed teacher-rank distribution, as we read it (its formula could not be read
    here): rank the teachers 1 (worst) to K (best) by their scores, ties sharing the mean rank;
    p_k = rank_k / sum_j rank_j."""
    s = torch.tensor(scores, dtype=torch.float64)  # [K]
    below = (s[None, :] < s[:, None]).sum(1).double()  # [K]: the teachers scoring less
    ties = (s[None, :] == s[:, None]).sum(1).double()  # [K]: scoring the same, itself included
    ranks = below + (ties + 1) / 2  # [K]
    return (ranks / ranks.sum()).tolist()

class TeacherSampler:
    def __init__(self, names, lr=0.1, momentum=0.9, normalize=True, seed=0, warmup=0):
        self.names = list(names)
        self.warmup = warmup  # the first `warmup` rewards only feed b and s
        self.theta = torch.zeros(len(names), dtype=torch.float64)  # [K] logits of p
        self.active = [True] * len(names)  # False once discarded
        self.lr = lr
        self.momentum = momentum  # of the moving baseline b and the moving mean square s^2
        self.normalize = normalize
        self.baseline = 0.0  # b, when only the drawn teacher is measured
        self.var = 0.0  # s^2
        self.steps = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.trace = []  # p after every update [steps][K]
        self.rewards = []  # [k, reward] of every update
        self.advantages = []  # r_j - b of every update [steps][K]; None for a teacher not measured
        self.phase1_steps = None  # updates before the first teacher selection

    def probs(self):
        """p = softmax(theta) over the active teachers, 0 for discarded ones: [K]."""
        inactive = ~torch.tensor(self.active, dtype=torch.bool)  # [K]
        return torch.softmax(self.theta.masked_fill(inactive, -math.inf), 0)

    def sample(self):
        """Index of the teacher for this step, drawn from p with the sampler's own generator."""
        return int(torch.multinomial(self.probs(), 1, generator=self.generator))

    def update(self, k, reward):
        """Stochastic single-weight REINFORCE step for the sampled teacher k; returns the advantage.
        reward: k's alone (a float; b: a moving average of past rewards), or every teacher's on this
        step's batch (a list of K; b = sum_j p_j r_j, the expected reward of this very step)."""
        advantages = [None] * len(self.names)
        if isinstance(reward, list):
            rewards = torch.tensor(reward, dtype=torch.float64)  # [K]
            advantages = (rewards - float(self.probs() @ rewards)).tolist()
        else:
            if self.steps == 0:
                self.baseline = reward  # no history yet: the first reward only sets the baseline
            advantages[k] = reward - self.baseline
            self.baseline = self.momentum * self.baseline + (1 - self.momentum) * reward
        adv = advantages[k]
        self.var = self.momentum * self.var + (1 - self.momentum) * adv * adv
        if self.normalize and self.var > 0:
            adv = adv / math.sqrt(self.var)
        if self.steps >= self.warmup:
            self.theta[k] += self.lr * adv * (1 - float(self.probs()[k]))
        self.steps += 1
        self.trace.append(self.probs().tolist())
        self.rewards.append([k, reward])
        self.advantages.append(advantages)
        return adv

    def select_teachers(self, keep):
        """Teacher selection after phase-1: keep the `keep` active teachers with the highest mean
        phase-1 advantage (see above; ties go to the higher p); the weight of the others goes to the
        kept ones pro rata. Returns every discarded name; selecting again changes nothing."""
        check_keep(keep, sum(self.active))
        if self.phase1_steps is None:
            self.phase1_steps = self.steps
        evidence = self.evidence()
        p = self.probs().tolist()
        score = [e["advantage"] if e["n"] else -math.inf for e in evidence]  # no evidence: last
        active = [i for i in range(len(self.names)) if self.active[i]]
        ranked = sorted(active, key=lambda i: (score[i], p[i]), reverse=True)
        self.active = [i in ranked[:keep] for i in range(len(self.names))]
        return self.discarded()

    def show_selection(self):
        """Print each teacher's phase-1 evidence, its p after phase-1 and what selection made of
        it."""
        print("teacher selection by mean phase-1 advantage "
              "(reward: mean ± standard error, n steps):")
        for t in self.record()["selection"]:
            verdict = "kept     " if t["kept"] else "discarded"
            if t["n"] == 0:
                print(f"  {verdict} {t['teacher']}: never measured, p {t['p']:.3f}")
                continue
            se = f"{t['reward_se']:.1e}" if t["reward_se"] is not None else "-"
            reward = f"{t['reward']:+.3e} ± {se} (n {t['n']})"
            print(f"  {verdict} {t['teacher']}: reward {reward}, p {t['p']:.3f}")

    def discarded(self):
        return [name for name, on in zip(self.names, self.active) if not on]

    def evidence(self):
        """What phase-1 measured of each teacher, a list of K dicts: n (the steps that measured
        it), its mean reward with the standard error, and its mean advantage r - b (None when
        unmeasured)."""
        n1 = self.steps if self.phase1_steps is None else self.phase1_steps
        out = []
        for j in range(len(self.names)):
            rewards = []
            advantages = []
            for (_, r), a in zip(self.rewards[:n1], self.advantages[:n1]):
                if a[j] is not None:  # j was measured at this step
                    rewards.append(r[j] if isinstance(r, list) else r)
                    advantages.append(a[j])
            n = len(rewards)
            r = torch.tensor(rewards, dtype=torch.float64)  # [n]
            out.append({"n": n,
                        "reward": float(r.mean()) if n else None,
                        "reward_se": float(r.std() / math.sqrt(n)) if n > 1 else None,
                        "advantage": sum(advantages) / n if n else None})
        return out

    def record(self):
        """What distribution.json shows of the learning: p after every step of phase-1 and of
        phase-2, [teacher drawn, reward] of every step, each teacher's phase-1 evidence and p at
        selection, and the teachers selection discarded."""
        n1 = self.steps if self.phase1_steps is None else self.phase1_steps
        p1 = self.trace[n1 - 1] if n1 else [1 / len(self.names)] * len(self.names)
        teachers = zip(self.names, p1, self.active, self.evidence())
        selection = [{"teacher": name, "p": p, "kept": on} | e for name, p, on, e in teachers]
        return {"phase1": self.trace[:n1], "phase2": self.trace[n1:], "rewards": self.rewards,
                "selection": selection, "discarded": self.discarded()}

    # ------------------------------------------------------------------ plain data (for resume.pt)
    def state_dict(self):
        state = {k: v for k, v in vars(self).items() if k not in ("theta", "generator")}
        tensors = {"theta": self.theta.tolist(), "generator": self.generator.get_state().tolist()}
        return state | tensors

    def load_state_dict(self, state):
        vars(self).update({k: v for k, v in state.items() if k not in ("theta", "generator")})
        self.theta = torch.tensor(state["theta"], dtype=torch.float64)
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
