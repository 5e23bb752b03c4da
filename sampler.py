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

where b is the baseline and s a moving root-mean-square of (r_k - b). When every teacher j is scored
on the step's own batch (distill.py's lookahead reward), b = sum_j p_j r_j, the reward expected under
p on that batch: what the batch adds to every teacher cancels. When only the drawn teacher is
measured, b is a moving average of past rewards. The full REINFORCE gradient would also move every
other theta_j by -lr * A * p_j; the single-weight strategy drops those terms. Dividing by s (our
variant; normalize=False turns it off) frees lr from the reward's units, which shrink as the student
learns. With warmup=W, the first W rewards only set b and s.

Selection rule (select_teachers): keep the `keep` teachers of highest weight. A discarded teacher's
theta is masked to -inf, so the softmax over the kept ones hands out the discarded mass in
proportion to the kept teachers' own weights: p'_k = p_k / sum_{kept} p_j.
"""
import math

import torch

def check_keep(keep, n):
    if not 1 <= keep <= n:
        raise ValueError(f"--keep {keep}: the team has {n} teachers (choose 1 to {n})")

class TeacherSampler:
    def __init__(self, names, lr=0.1, momentum=0.9, normalize=True, seed=0, warmup=0):
        self.names, self.warmup = list(names), warmup  # the first `warmup` rewards only feed b and s
        self.theta = torch.zeros(len(names), dtype=torch.float64)  # [K] logits of p
        self.active = [True] * len(names)                           # False once discarded
        self.lr, self.momentum, self.normalize = lr, momentum, normalize
        self.baseline, self.var, self.steps = 0.0, 0.0, 0
        self.generator = torch.Generator().manual_seed(seed)
        self.trace, self.rewards = [], []  # p after every update [steps][K]; (k, reward) of every update
        self.phase1_steps = None            # updates before the first teacher selection

    def probs(self):
        """p = softmax(theta) over the active teachers, 0 for discarded ones: [K]."""
        return torch.softmax(self.theta.masked_fill(~torch.tensor(self.active), -math.inf), 0)

    def sample(self):
        """Index of the teacher for this step, drawn from p with the sampler's own generator."""
        return int(torch.multinomial(self.probs(), 1, generator=self.generator))

    def update(self, k, reward):
        """Stochastic single-weight REINFORCE step for the sampled teacher k; returns the advantage.
        reward: k's alone (a float; b: a moving average of past rewards), or every teacher's on this
        step's batch (a list of K; b = sum_j p_j r_j, the expected reward of this very step)."""
        if isinstance(reward, list):
            adv = reward[k] - float(self.probs() @ torch.tensor(reward, dtype=torch.float64))
        else:
            if self.steps == 0:
                self.baseline = reward  # no history yet: the first reward only sets the baseline
            adv = reward - self.baseline
            self.baseline = self.momentum * self.baseline + (1 - self.momentum) * reward
        self.var = self.momentum * self.var + (1 - self.momentum) * adv * adv
        if self.normalize and self.var > 0:
            adv = adv / math.sqrt(self.var)
        if self.steps >= self.warmup:
            self.theta[k] += self.lr * adv * (1 - float(self.probs()[k]))
        self.steps += 1
        self.trace.append(self.probs().tolist())
        self.rewards.append([k, reward])
        return adv

    def select_teachers(self, keep):
        """Teacher selection after phase-1: keep the `keep` heaviest active teachers; their weight goes
        to the kept ones pro rata (see above). Returns every discarded name; selecting again changes nothing."""
        check_keep(keep, sum(self.active))
        kept = set(torch.argsort(self.probs(), descending=True)[:keep].tolist())
        self.active = [i in kept for i in range(len(self.names))]
        self.phase1_steps = self.steps if self.phase1_steps is None else self.phase1_steps
        return self.record()["discarded"]

    def record(self):
        """What distribution.json shows of the learning: p after every step of phase-1 and of phase-2,
        [teacher drawn, reward] of every step, and the teachers selection discarded."""
        n1 = self.steps if self.phase1_steps is None else self.phase1_steps
        return {"phase1": self.trace[:n1], "phase2": self.trace[n1:], "rewards": self.rewards,
                "discarded": [n for n, on in zip(self.names, self.active) if not on]}

    # ------------------------------------------------------------------ plain data (for resume.pt)
    def state_dict(self):
        state = {k: v for k, v in vars(self).items() if k not in ("theta", "generator")}
        return state | {"theta": self.theta.tolist(), "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state):
        vars(self).update({k: v for k, v in state.items() if k not in ("theta", "generator")})
        self.theta = torch.tensor(state["theta"], dtype=torch.float64)
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
