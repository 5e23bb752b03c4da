"""AutoSKDBERT ("Learn to Stochastically Distill BERT"): a small BERT distilled from a team.

    python distill.py --task RTE      # phase-1, teacher selection, phase-2, the final student
    python distill.py --task RTE --strategy none --student <name or folder> --out_dir <folder>
    torchrun --nproc_per_node=N distill.py --task RTE   # data-parallel: nccl on GPUs, gloo on CPUs

The second command fine-tunes one teacher. The method reads top-down to the banner "the command"
(below it: the command, and the plumbing the method calls by name). Each step draws ONE teacher
k ~ Categorical(p) and distils from it alone (Teaching, train). Phase-1 learns p over the team,
teacher selection discards the ineffective teachers, phase-2 refines p over the kept ones, each
step moving theta_k alone by a reward on held-out TRAINING examples, never dev (autoskd, the
reward, sampler.py). The final student, the one reported, distils from the frozen p.
"""
import argparse
import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoTokenizer

import glue_data
import model
import teachers
from sampler import TeacherSampler, check_keep, check_skd_weights, teacher_rank

# ------------------------------------------------------------------------- each strategy's teaching
@dataclass
class Teaching:
    """What a strategy teaches with, and how a step uses it (per_step): it distils from "one"
    teacher k drawn from p (auto, uniform, skd; single: a team of one), from the team's "mean"
    (ensemble), or from the "labels" alone (none: fine-tuning, no team)."""
    soft: torch.Tensor  # [K, N, C]: each teacher's soft targets at temperature T; "mean": [1, N, C]
    sampler: TeacherSampler  # p over the team's K teachers
    per_step: str = "one"
    learn_p: bool = False  # auto: phases 1-2 learn p before the final student

    def draw(self):
        """Return this step's teacher k and its soft targets [N, C], each None if there is none."""
        if self.per_step == "one":
            k = self.sampler.sample()  # k ~ Categorical(p)
            return k, self.soft[k]
        if self.per_step == "mean":
            return None, self.soft[0]
        return None, None

def teach(args, team, device):
    """Return each strategy's Teaching of the team (teachers.Teacher objects), in one place."""
    names = [t.name for t in team]
    sampler = TeacherSampler(names, lr=args.sampler_lr, seed=args.seed, warmup=args.sampler_warmup)
    if not team:
        return Teaching(torch.empty(0), sampler, per_step="labels")  # none: fine-tuning
    soft = torch.stack([model.soft_targets(t.train, args.temperature) for t in team]).to(device)
    if args.strategy == "ensemble":
        mean = soft.mean(0, keepdim=True)  # [1, N, C]; p stays uniform: the equal shares
        return Teaching(mean, sampler, per_step="mean")
    if args.strategy == "skd":  # SKDBERT: a fixed p, p_k = w_k / sum_j w_j
        weights = args.weights or teacher_rank([glue_data.score(t.dev_metrics) for t in team])
        sampler.theta = torch.tensor(weights, dtype=torch.float64).log()
        shown = [f"{name} {p:.3f}" for name, p in zip(names, sampler.probs())]
        print("skd distribution: " + ", ".join(shown))
    return Teaching(soft, sampler, learn_p=args.strategy == "auto")  # uniform, single: p as it is

# ------------------------------------------------------------------------------------- AutoSKD
def autoskd(run, resume, base, teaching, keep):
    """AutoSKD. With --strategy auto, p is learned first, on a student used for nothing else:
    phase-1 over the whole team, teacher selection, phase-2 over the kept teachers, with rewards on
    held-out labelled examples. Then the final student, the one reported (every strategy): fresh,
    on all of train (and the transfer set), drawing its teachers from the frozen p. Returns it."""
    a = run.args
    n = run.n_labelled  # train's examples; those of the transfer set follow them
    everything = torch.arange(len(run.labels))  # [N + M]
    if teaching.learn_p:
        shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed))
        n_held = max(1, int(a.heldout * n))
        heldout = shuffled[:n_held]  # the reward's examples, never trained on in phases 1-2
        train_idx = torch.cat([shuffled[n_held:], everything[n:]])  # the rest, then transfer
        reward = REWARDS[a.reward](run, heldout, teaching.soft)
        steps1 = count_steps(a.phase1_epochs, len(train_idx), a.batch_size)
        steps2 = count_steps(a.phase2_epochs, len(train_idx), a.batch_size)
        print(f"AutoSKD: phase-1 {steps1} steps, teacher selection, phase-2 {steps2} steps; then:")
        epochs = a.phase1_epochs + a.phase2_epochs
        trainee = new_student(run, base, epochs, len(train_idx))
        train(run, resume, "phase1", trainee, a.phase1_epochs, train_idx, teaching, reward)
        teaching.sampler.select_teachers(keep)  # teacher selection, by the phase-1 evidence
        teaching.sampler.show_selection()
        train(run, resume, "phase2", trainee, a.phase2_epochs, train_idx, teaching, reward)
    # The final student: p frozen, no reward.
    steps = count_steps(a.epochs, len(everything), a.batch_size)
    print(f"{run.shown['final']}: {a.epochs} epoch(s), {steps} steps")
    trainee = new_student(run, base, a.epochs, len(everything))
    train(run, resume, "final", trainee, a.epochs, everything, teaching)
    return trainee.model

# ------------------------------------------------------------------------------- the training loop
def train(run, resume, phase, trainee, epochs, train_idx, teaching, reward=None):
    """Train the student for `epochs` over train_idx (indices into run's examples). Each step: k ~
    Categorical(p), the reward's look before the step (phases 1-2), the KD loss on teacher k's soft
    targets, an AdamW step, and sampler.update(k, reward), which moves theta_k alone."""
    a = run.args
    sampler = teaching.sampler
    parts = dict(student=trainee.model, opt=trainee.opt, sched=trainee.sched, sampler=sampler,
                 reward=reward)
    at = resume.restore(phase, parts)  # (epoch, batch, step) to go on from
    if at is None:
        return  # the phase had finished before the run was killed
    first_epoch, skip, step = at
    ema = None  # the loss shown and checked for NaN: a moving average over the phase
    trainee.model.train()  # dropout on: from_pretrained hands over a model in eval mode
    for epoch in range(first_epoch, epochs + 1):
        began = run.clock()
        order_state = run.order.get_state()  # resume draws the epoch's batches again from it
        batches = glue_data.batches(run.lengths[train_idx], a.batch_size, run.order)
        desc = f"{run.shown[phase]} epoch {epoch}/{epochs}"
        bar = tqdm(batches[skip:], desc, len(batches), initial=skip, mininterval=1)
        for i, b in enumerate(bar, skip):
            if len(b) < run.world:
                continue  # a last batch too small to give every rank an example
            idx = train_idx[b].tolist()[run.rank::run.world]  # this rank's share of the batch
            k, soft_k = teaching.draw()  # k ~ Categorical(p)
            lr = trainee.opt.param_groups[0]["lr"]
            if reward:
                reward.before(trainee.model, idx, step, lr, sampler.active)
            layer = reward.layer if reward else None  # whose features the reward reads
            loss, seen = run.step_loss(trainee.net, idx, soft_k, layer)
            ema = loss.detach() if ema is None else 0.98 * ema + 0.02 * loss.detach()
            due = (step + 1) % a.save_every == 0  # a checkpoint after this step
            if run.device.type == "cpu" or bar.n % 50 == 0 or due or i == len(batches) - 1:
                check_loss(run, ema, bar, f"{run.shown[phase]} epoch {epoch} step {step + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), 1.0)
            trainee.opt.step()
            trainee.sched.step()
            trainee.opt.zero_grad(set_to_none=True)
            if reward:
                sampler.update(k, reward.after(trainee.model, step, seen))  # only theta_k moves
            step += 1
            if due:
                resume.checkpoint(parts, phase=phase, epoch=epoch, batch=i + 1, step=step,
                                  order=order_state)
        skip = 0
        run.count_time(phase, step, run.clock() - began)
        evaluate(run, phase, epoch, trainee.model)
        resume.checkpoint(parts, phase=phase, epoch=epoch + 1, batch=0, step=step,
                          order=run.order.get_state())

# ------------------------------------------------------------------------------------ the reward
# The reward as plain functions of a student and tensors: copy them into any training loop.
# --reward lookahead (default): EVERY teacher j is scored on the step's batch by how much a step of
# size lr on its soft targets would lower the held-out expected error E, to first order. Teacher
# j's step is -lr * g_j, so with z [B, C] the batch's logits:
#     r_j = lr * <h, g_j> = lr * <J h, dL_j/dz>,   h = dE/dtheta, g_j = J^T dL_j/dz, J = dz/dtheta
#
# Teachers differ only in dL_j/dz (teacher_pulls), so ONE product J h scores the whole team on the
# same batch and held-out examples, and the sampler's baseline sum_j p_j r_j cancels what the batch
# adds to all of them. A known bias: r_j - r_k is linear in the soft targets q_k - q_j, so of two
# teachers right as often the less sure one scores less (results/README.md).
#
# --reward_reach output (default): theta is the output layer alone, z = W u + b (u [B, d]: the
# features it reads). Then J h needs no pass through the body, as in GLISTER-ONLINE's one-step
# lookahead from last-layer gradients (Killamsetty et al., AAAI 2021); u': the held-out features:
#     (J h)_i = h_W u_i + h_b,   h_W = sum_m dE/dz'_m u'_m^T,   h_b = sum_m dE/dz'_m
#
# u and z come from the training step's own forward (dropout on, so u carries its mask; h is
# measured with dropout off): the reward costs no pass of its own.
# --reward_reach student: J h over every trainable weight, by one forward-mode pass (about a
# fine-tuning step's work). --reward step: see StepReward.
@contextlib.contextmanager
def dropout_off(student):
    """Run the block with the student in eval mode (dropout off), then restore its mode."""
    was_training = student.training
    student.eval()
    try:
        yield
    finally:
        student.train(was_training)

def at_least_float32(x):
    """Return x in float32 if it is in a narrower float (bf16 autocast), else as it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

def teacher_pulls(z, labels, soft, temperature, alpha, labelled=None):
    """Return dL_j/dz [K, B, C], the KD loss's gradient over the logits z [B, C] for each teacher's
    soft targets in soft [K, B, C]. labels [B]; labelled [B] bool (None: all labelled)."""
    z = at_least_float32(z.detach()).requires_grad_()
    pulls = []
    with torch.enable_grad():
        for soft_j in soft:
            loss = model.kd_loss(z, labels, soft_j, temperature, alpha, labelled)
            pulls.append(torch.autograd.grad(loss, z)[0])
    return torch.stack(pulls)

@torch.no_grad()
def heldout_output_grad(student, batch, labels):
    """Return h through the output layer alone, [h_W [C, d], h_b [C]]: the gradient of the expected
    error E on held-out examples over the layer's weight and bias, from one forward without
    gradients, dropout off. batch: {input name: [H, L]} and labels [H] go to the layer's device."""
    layer = model.output_layer(student)
    device = layer.weight.device
    batch = {name: x.to(device) for name, x in batch.items()}
    with dropout_off(student):
        u, z = model.features_and_logits(student, batch, layer)  # [H, d], [H, C]
    with torch.autocast(device.type, enabled=False):  # float32 (or 64) under bf16 autocast too
        dE_dz = model.expected_error_grad(at_least_float32(z), labels.to(device))  # [H, C]
        h_W = dE_dz.T @ u.to(dE_dz.dtype)  # [C, d]
    h_b = dE_dz.sum(0) if layer.bias is not None else torch.zeros_like(dE_dz[0])  # [C]
    return [h_W, h_b]

def output_layer_rewards(u, z, labels, soft, h, lr, temperature, alpha, labelled=None):
    """Return every teacher's r_j = lr * <J h, dL_j/dz> through the output layer, [K]. u [B, d] and
    z [B, C] come from model.features_and_logits, h from heldout_output_grad; the rest as below."""
    h_W, h_b = h
    with torch.autocast(z.device.type, enabled=False):  # float32 (or 64) under bf16 autocast too
        u = u.detach().to(torch.promote_types(u.dtype, h_W.dtype))
        jh = u @ h_W.T + h_b  # [B, C]
        pulls = teacher_pulls(z, labels, soft, temperature, alpha, labelled)  # [K, B, C]
    return lr * (pulls * jh).sum((1, 2))

def heldout_grad(student, batch, labels):
    """Return h, the gradient of the expected error E on held-out examples (batch: {input name:
    [H, L]}, labels [H]) over the trainable weights, dropout off: tensors in parameters() order,
    each with a storage of its own (forward-mode AD would copy a slice of a larger tensor at each
    use)."""
    params = [p for p in student.parameters() if p.requires_grad]
    with dropout_off(student):
        logits = at_least_float32(student(**batch).logits)  # [H, C]
    dE_dz = model.expected_error_grad(logits.detach(), labels)  # [H, C]
    h = torch.autograd.grad(logits, params, dE_dz, materialize_grads=True)  # J^T dE/dz
    return list(h)

def lookahead_rewards(student, batch, labels, soft, h, lr, temperature, alpha, labelled=None):
    """Return every teacher's r_j = lr * <J h, dL_j/dz> through every trainable weight, [K], on
    batch ({input name: [B, L]}, labels [B]), with soft [K, B, C] the teachers' soft targets and h
    from heldout_grad. labelled [B] bool is False for transfer examples (None: all
    labelled)."""
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]  # as in h
    names = [n for n, _ in trained]
    weights = tuple(p.detach() for _, p in trained)

    def logits(*w):
        z = torch.func.functional_call(student, dict(zip(names, w)), kwargs=batch).logits
        return at_least_float32(z)

    # Forward-mode AD: z and J h in one pass, exact, in float32 (bf16 would drown J h). The fused
    # attention kernels have no forward-mode derivative; the plain one computes the same.
    device = weights[0].device.type
    with dropout_off(student), torch.autocast(device, enabled=False), sdpa_kernel(SDPBackend.MATH):
        z, jh = torch.func.jvp(logits, weights, tuple(h))  # [B, C] each
    return lr * (teacher_pulls(z, labels, soft, temperature, alpha, labelled) * jh).sum((1, 2))

class LookaheadReward:
    """The reward of --reward lookahead scores every teacher's r_j on the step's batch (K floats,
    the mean over ranks), with h measured anew every --probe_every steps; with --lookahead_share
    below 1, on the rows where the teachers in play differ most."""

    def __init__(self, run, heldout, soft):
        self.run = run
        self.heldout = HeldOut(run, heldout)
        self.soft = soft  # [K, N, C]
        self.reach = run.args.reward_reach
        self.h = None  # what the rewards need of the held-out batch: dE/dtheta
        self.layer = None  # reach output: the output layer, found at the first step
        self.scored = None  # the step's (batch, its rows scored, their share, lr)
        self.values = None  # reach student: the step's r_j

    def before(self, student, idx, step, lr, active):
        """Look at the batch idx before the step (active: K bools, the teachers in play)."""
        run, a = self.run, self.run.args
        if step % a.probe_every == 0 or self.h is None:
            inputs, labels, n = self.heldout.at(step)
            gradient = heldout_output_grad if self.reach == "output" else heldout_grad
            with run.autocast():
                self.h = run.reduce_mean(gradient(student, inputs, labels), n)
        rows = list(range(len(idx)))
        m = math.ceil(a.lookahead_share * len(idx))
        if m < len(idx):
            in_play = self.soft[:, idx][torch.tensor(active)]
            rows = model.where_teachers_differ(in_play, m).tolist()
        share = len(rows) / len(idx)  # as a mean over the batch: the rest adds next to nothing
        self.scored = (idx, rows, share, lr)
        if self.reach == "output":  # after(): from the step's own features
            self.layer = self.layer if self.layer is not None else model.output_layer(student)
            return
        inputs, i = run.batch([idx[j] for j in rows])
        values = lookahead_rewards(student, inputs, run.labels[i], self.soft[:, i], self.h, lr,
                                   a.temperature, a.alpha, run.labelled[i])
        self.values = run.reduce_mean(values * share, 1).tolist()  # [K], as DDP averages gradients

    def after(self, student, step, seen):
        """Return the step's rewards [K]; seen is (u [B, d], z [B, C]) of its forward at layer."""
        if self.reach == "student":
            return self.values
        run = self.run
        idx, rows, share, lr = self.scored
        i = torch.tensor([idx[j] for j in rows], device=run.device)
        u, z = (x.detach()[torch.tensor(rows, device=x.device)] for x in seen)
        values = output_layer_rewards(u, z, run.labels[i], self.soft[:, i], self.h, lr,
                                      run.args.temperature, run.args.alpha, run.labelled[i])
        return run.reduce_mean(values * share, 1).tolist()  # [K]

    def state_dict(self):
        return {"h": self.h}

    def load_state_dict(self, state):
        self.h = state["h"]

class StepReward:
    """The reward of --reward step scores the drawn teacher alone (a float): the held-out loss
    before its step minus after it, on one held-out batch (a new one every --probe_every steps)."""
    layer = None  # no features from the step's forward

    def __init__(self, run, heldout, soft):
        self.run = run
        self.heldout = HeldOut(run, heldout)
        self.loss = None  # the held-out loss before the next step

    @torch.no_grad()
    def measure(self, student, step):
        """Return the hard-label loss on the step's held-out batch, dropout off, mean over ranks."""
        inputs, labels, n = self.heldout.at(step)
        with dropout_off(student), self.run.autocast():
            loss = model.kd_loss(student(**inputs).logits.float(), labels)  # [H, C] logits
        return float(self.run.reduce_mean(loss, n))

    def before(self, student, idx, step, lr, active):
        if step % self.run.args.probe_every == 0 or self.loss is None:
            self.loss = self.measure(student, step)

    def after(self, student, step, seen):
        loss = self.measure(student, step)
        reward = self.loss - loss
        self.loss = loss
        return reward

    def state_dict(self):
        return {"loss": self.loss}

    def load_state_dict(self, state):
        self.loss = state["loss"]

REWARDS = {"lookahead": LookaheadReward, "step": StepReward}  # by --reward

# ==================================================================================================
# The command: arguments, data, the team, a recipe's teachers, saving. And the plumbing the method
# calls by name: the run's data and batches (Run), a fresh student (new_student), what the reward
# reads (HeldOut), resume (Resume).
# ==================================================================================================
STRATEGIES = ("auto", "uniform", "skd", "single", "ensemble", "none")
PHASES = ("phase1", "phase2", "final")

def parse_args(argv=None):
    """Read the command's flags (argv: a list, default sys.argv) and check their ranges."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, help="GLUE task: " + ", ".join(glue_data.TASKS))
    p.add_argument("--data_dir", default="glue_data", help="folder with <TASK>/train.tsv, dev.tsv")
    p.add_argument("--teachers", nargs="+", help="teacher checkpoints (default: teachers/<TASK>/*)")
    p.add_argument("--team", help="recipe built in empty teachers/<TASK>/: small or paper")
    p.add_argument("--student", help="pretrained checkpoint (default: the teachers' base model)")
    p.add_argument("--student_layers", type=int, help="the bottom layers kept (default: all)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    p.add_argument("--keep", type=int, help="teachers selection keeps (default: half, rounded up)")
    p.add_argument("--weights", type=float, nargs="+", help="skd's p (default: teacher-rank)")
    p.add_argument("--transfer", help="unlabelled examples (test-file format) to distil on too")
    add_training_flags(p)
    a = p.parse_args(argv)
    a.out_dir = a.out_dir or f"runs/{a.task}-{a.strategy}-seed{a.seed}"
    in_range = {
        "batch_size": a.batch_size >= 1,
        "epochs": a.epochs >= 1,
        "temperature": a.temperature > 0,
        "alpha": 0 <= a.alpha <= 1,
        "heldout": 0 < a.heldout < 1,
        "probe_every": a.probe_every >= 1,
        "probe_size": a.probe_size is None or a.probe_size >= 1,
        "lookahead_share": 0 < a.lookahead_share <= 1,
        "save_every": a.save_every >= 1,
        "sampler_warmup": a.sampler_warmup >= 0,
    }
    for name, ok in in_range.items():
        if not ok:
            p.error(f"--{name} {getattr(a, name)} is out of range")
    return a

def add_training_flags(p):
    """Add the flags of how the students train: budget, KD loss, sampler and reward, seed,
    outputs and resume."""
    p.add_argument("--epochs", type=int, default=3, help="epochs of the final (reported) training")
    p.add_argument("--phase1_epochs", type=int, default=1)
    p.add_argument("--phase2_epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5, help="student learning rate (AdamW)")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature T")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) loss")
    p.add_argument("--sampler_lr", type=float, default=0.1, help="lr of the teacher weights")
    p.add_argument("--sampler_warmup", type=int, default=0, help="steps whose rewards only set b")
    p.add_argument("--heldout", type=float, default=0.1, help="train's share held out for rewards")
    p.add_argument("--reward", default="lookahead", choices=("lookahead", "step"))
    p.add_argument("--reward_reach", default="output", choices=("output", "student"),
                   help="the weights the lookahead looks through: the output layer, or all")
    p.add_argument("--probe_every", type=int, default=4, help="steps sharing a held-out batch")
    p.add_argument("--probe_size", type=int, help="held-out batch size (default: --batch_size)")
    p.add_argument("--lookahead_share", type=float, default=1.0, help="share scored")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", help="outputs (default: runs/<TASK>-<strategy>-seed<N>)")
    p.add_argument("--cache_dir", default="cache", help="where teacher outputs are cached")
    p.add_argument("--resume", action="store_true", help="go on from <out_dir>/resume.pt")
    p.add_argument("--save_every", type=int, default=500, help="steps between resume checkpoints")
    p.add_argument("--predict_test", action="store_true", help="write test predictions for GLUE")

def main(args):
    """Run the command: read the data, choose the team (a --team recipe is fine-tuned first when
    there is none), then distil the student and save it."""
    started = time.time()
    if finished_already(args):
        return
    data, transfer, test = read_data(args)
    names, base = choose_models(args, data)
    distil_and_save(args, data, names, base, transfer, test, started)

def read_data(args):
    """Read every file the run needs before anything long starts, so that a bad row stops it at
    once. Returns train and dev ({split: Examples}), the transfer set (None without --transfer)
    and the test splits (empty without --predict_test)."""
    glue_data.fetch_missing(args.task, args.data_dir)
    data = glue_data.load_task(args.data_dir, args.task)
    transfer = None
    if args.transfer and args.strategy == "none":
        print(f"note: --strategy none has no teacher to label {args.transfer}; it is not used")
    elif args.transfer:
        transfer = glue_data.read_split(args.transfer, args.task, labelled=False)
    test = glue_data.load_task(args.data_dir, args.task, test=True) if args.predict_test else {}
    return data, transfer, test

def distil_and_save(args, data, names, base, transfer, test, started, title=None):
    """Distil base's bottom layers from the teachers in names with args.strategy (no teachers: plain
    fine-tuning), predict the test splits and save everything. started is time.time() when the
    command began; title is what progress calls the training (default: student, or fine-tune)."""
    check_skd_weights(args.weights, names, args.strategy)
    model.layers_to_keep(base, args.student_layers)  # fail now, not after the teachers have run
    keep = args.keep if args.keep is not None else math.ceil(len(names) / 2)
    if args.strategy == "auto":
        check_keep(keep, len(names))
    tokenizer = AutoTokenizer.from_pretrained(base)
    run = Run(args, data, tokenizer, transfer, title)
    resume = Resume(run)
    team = []
    if names:
        teacher_data = data | ({"transfer": transfer} if transfer else {})
        team = teachers.load_team(names, args.task, teacher_data, args.max_seq_len,
                                  args.cache_dir, run.device)
    run.timings["teachers_s"] = time.time() - started
    teaching = teach(args, team, run.device)
    student = autoskd(run, resume, base, teaching, keep)
    student.eval()
    predictions = {}  # (every rank takes part)
    for split, examples in test.items():
        logits = teachers.predict(student, tokenizer, examples, args.max_seq_len, run.device)
        predictions[split] = glue_data.label_texts(args.task, logits)
    dev = data[glue_data.get_task(args.task).dev[0]]
    t = run.clock()
    figures = teachers.beside_the_team(team, student, tokenizer, dev, args.max_seq_len, run.device)
    run.timings["table_s"] = run.clock() - t
    run.timings["total_s"] = time.time() - started
    if run.rank == 0:  # rank 0 writes
        save_outputs(run, student, team, teaching, predictions, figures)
        resume.finish()
    if run.world > 1:
        dist.barrier()  # the ranks end together: one torn down while another still runs can abort

def finished_already(args):
    """Tell whether --resume names a run that had finished; its results are then left alone."""
    metrics = os.path.join(args.out_dir, "metrics.json")
    resumable = os.path.isfile(os.path.join(args.out_dir, "resume.pt"))
    finished = args.resume and os.path.isfile(metrics) and not resumable
    if finished:
        print(f"{args.out_dir} holds a finished run ({metrics}): nothing to resume; left as is")
    return finished

def choose_models(args, data):
    """Return the teachers' checkpoints (--teachers, or those found; a --team recipe may be
    fine-tuned first) and the student's (--student, the recipe's, or the teachers' recorded
    base)."""
    if args.strategy == "none":
        if not args.student:
            raise ValueError("--strategy none fine-tunes --student: name a pretrained checkpoint "
                             "(hub name or folder)")
        return [], args.student
    fine_tune_one = functools.partial(fine_tune, args, data)
    n = len(data["train"])
    names, recipe = teachers.choose_team(args.teachers, args.task, args.team, fine_tune_one, n)
    if args.strategy == "single" and len(names) != 1:
        raise ValueError(f"--strategy single distils from one teacher; {len(names)} given: "
                         f"name one with --teachers DIR")
    if args.student:
        return names, args.student
    if recipe:
        args.student_layers = args.student_layers or recipe.student_layers
        print(f"student: {recipe.student} (the {args.team or 'small'} team's)")
        return names, recipe.student
    base = teachers.recorded_base(names)
    print(f"student: {base} (the base model the teachers were fine-tuned from)")
    return names, base

def fine_tune(args, data, teacher, checkpoint, lr, epochs, batch_size, out):
    """Fine-tune one teacher of a recipe from checkpoint into out (--strategy none) on the data of
    the run args, resumed if it was killed."""
    argv = ["--task", args.task, "--data_dir", args.data_dir, "--strategy", "none",
            "--student", checkpoint, "--epochs", str(epochs), "--lr", str(lr),
            "--batch_size", str(batch_size), "--max_seq_len", str(args.max_seq_len),
            "--seed", str(args.seed), "--out_dir", out]
    resume = os.path.isfile(os.path.join(out, "resume.pt"))
    print(f"fine-tuning teacher {teacher} ({checkpoint})" + (", resumed" if resume else ""))
    teacher_args = parse_args(argv + ["--resume"] * resume)
    distil_and_save(teacher_args, data, [], checkpoint, None, {}, time.time(),
                    f"fine-tune {teacher}")

def save_outputs(run, student, team, teaching, test, figures):
    """Write the student with its model card, metrics.json, distribution.json and the test
    predictions, each whole or not at all, and print the student beside its team."""
    a = run.args
    out = a.out_dir
    model.save_student(student, run.tokenizer, out)
    dev = run.history[-1]["dev"]
    names = [t.name for t in team]
    final = teaching.sampler.probs().tolist()
    metrics = {"task": a.task, "strategy": a.strategy, "seed": a.seed, "dev": dev,
               "score": glue_data.score(dev), "history": run.history, "timings": run.timings,
               "teachers": {t.name: t.dev_metrics for t in team}, "args": vars(a)}
    kept = teaching.sampler.active if teaching.learn_p else None  # selection's verdicts
    table = teachers.closing_table(team, figures, metrics["score"], kept, final) if team else {}
    metrics["beside_the_team"] = table
    glue_data.write_json(os.path.join(out, "metrics.json"), metrics)
    if team:
        learned = teaching.sampler.record() if teaching.learn_p else {}
        distribution = {"teachers": names, "final": final} | learned
        glue_data.write_json(os.path.join(out, "distribution.json"), distribution)
        shown = [f"{name} {p:.3f}" for name, p in zip(names, final)]
        print("final distribution: " + ", ".join(shown))
    card = model.model_card(a, student, dev, names, final, table.get("lines", []))
    glue_data.write_atomic(os.path.join(out, "README.md"), lambda f: f.write(card))
    for split, labels in test.items():
        glue_data.write_predictions(a.task, split, labels, out)
    done = f"done in {run.timings['total_s']:.0f}s: dev score {metrics['score']:.4f}; wrote {out}"
    print("\n".join([done] + table.get("lines", [])))  # then the student beside its teachers

# ----------------------------------------------------------------- what the reward reads
class HeldOut:
    """The reward's held-out TRAINING examples (never dev), in batches of --probe_size: one batch
    every --probe_every steps, each rank measuring its share of it."""

    def __init__(self, run, idx):
        self.run = run
        self.idx = idx  # [H] indices of held-out training examples
        size = min(len(idx), run.args.probe_size or run.args.batch_size)
        batches = glue_data.batches(run.lengths[idx], size)
        self.batches = [b for b in batches if len(b) >= run.world]  # every rank takes a share
        if not self.batches:
            raise ValueError(f"held-out batches of {size} cannot be shared by {run.world} "
                             f"processes: raise --probe_size or --heldout")

    def examples(self, step):
        """Return the indices of the step's held-out batch, every rank's."""
        n = step // self.run.args.probe_every
        return self.idx[self.batches[n % len(self.batches)]].tolist()

    def at(self, step):
        """Return this rank's share of the step's held-out batch: ({input: [H, L]}, labels [H],
        H)."""
        mine = self.examples(step)[self.run.rank::self.run.world]
        inputs, i = self.run.batch(mine)
        return inputs, self.run.labels[i], len(mine)

# ------------------------------------------------------------------------------- the run's data
def init_distributed():
    """Return (device, rank, world): one process a device under torchrun (nccl on GPUs, gloo on
    CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank() if world > 1 else 0, world

class Run:
    """What the steps of a run share: the training examples, encoded once for the student (train's
    N labelled ones, then the M of the transfer set), on the device; this process's rank among
    world; the batch order; the dev history and timings that metrics.json reports."""

    def __init__(self, args, data, tokenizer, transfer=None, title=None):
        self.args = args
        final = title or ("fine-tune" if args.strategy == "none" else "student")
        self.shown = {"phase1": "phase-1", "phase2": "phase-2", "final": final}  # progress's names
        self.data = data
        self.tokenizer = tokenizer
        self.device, self.rank, self.world = init_distributed()
        # CPU time on CPU: a virtual machine's host may steal wall time
        self.clock = time.process_time if self.device.type == "cpu" else time.perf_counter
        labelled = data["train"]
        examples = glue_data.concat(labelled, transfer) if transfer else labelled
        self.n_labelled = len(labelled)
        self.enc = glue_data.encode(tokenizer, examples, args.max_seq_len)  # [N + M] token ids
        self.lengths = torch.tensor(glue_data.lengths(self.enc))  # [N + M]
        labels = labelled.labels + [0] * (len(examples) - len(labelled))  # transfer's: unused
        self.labels = torch.tensor(labels, device=self.device)  # [N + M] long; STS-B: float
        self.labelled = torch.arange(len(examples), device=self.device) < len(labelled)  # [N + M]
        self.order = torch.Generator().manual_seed(args.seed)  # batch order
        self.history = []  # dev metrics, every epoch
        self.timings = {}  # timings (since this process started)

    def batch(self, idx):
        """Return examples idx on the device, ({token tensor name: [B, L]}, idx [B]); on GPU they go
        through pinned memory, with no host sync."""
        b = glue_data.collate(self.tokenizer, self.enc, idx) | {"idx": torch.tensor(idx)}
        if self.device.type == "cuda":
            b = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in b.items()}
        return b, b.pop("idx")

    def autocast(self):
        """Return bf16 autocast on GPU, and a context that does nothing on CPU."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda")

    def step_loss(self, net, idx, soft_k, layer=None):
        """Return the KD loss of net on the examples idx and what layer saw (u, z; None without a
        layer). soft_k [N, C] is one teacher's soft targets (None: the labels alone)."""
        a = self.args
        b, i = self.batch(idx)
        seen = None
        with self.autocast():
            if layer is None:
                logits = net(**b).logits
            else:
                seen = model.features_and_logits(net, b, layer)
                logits = seen[1]
        logits = logits.float()  # [B, C]
        targets = soft_k[i] if soft_k is not None else None
        return model.kd_loss(logits, self.labels[i], targets, a.temperature, a.alpha,
                             self.labelled[i]), seen

    def reduce_mean(self, value, n):
        """Return the mean over ranks of a per-rank mean of n examples: of a tensor of any shape, or
        of a list of them (one all-reduce for all)."""
        if self.world == 1:
            return value
        parts = value if isinstance(value, list) else [value]
        count = torch.tensor([float(n)], device=parts[0].device)
        t = torch.cat([v.detach().float().reshape(-1) * n for v in parts] + [count])  # [numel + 1]
        dist.all_reduce(t)
        means = (t[:-1] / t[-1]).split([v.numel() for v in parts])
        out = [m.view_as(v).clone() for m, v in zip(means, parts)]  # each with its own storage
        return out if isinstance(value, list) else out[0]

    def count_time(self, phase, steps, seconds):
        """Add the training steps' own time (no evaluation) to the timings metrics.json gets."""
        self.timings[phase + "_steps"] = steps
        self.timings[phase + "_steps_s"] = self.timings.get(phase + "_steps_s", 0) + seconds

# ------------------------------------------------------------------------- a student in training
@dataclass
class Trainee:
    """A student in training: the model, what a step calls (the model, or its DDP wrapper under
    torchrun), its AdamW and its learning-rate schedule."""
    model: torch.nn.Module
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR

def new_student(run, base, epochs, n_train):
    """Return a fresh Trainee of base's bottom --student_layers layers, to train `epochs` over
    n_train examples."""
    a = run.args
    torch.manual_seed(a.seed)  # the new head and dropout repeat with the seed
    labels = glue_data.get_task(a.task).labels
    fresh = model.build_student(base, labels, a.student_layers, a.task)[0].to(run.device)
    if run.rank:
        torch.manual_seed(a.seed + 1000 * run.rank)  # each rank its own dropout masks
    net = DDP(fresh, forward_sync_buffers=False) if run.world > 1 else fresh
    steps = count_steps(epochs, n_train, a.batch_size)
    warmup = max(1, steps // 10)
    opt = torch.optim.AdamW(fresh.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_then_decay(step, warmup, steps))
    return Trainee(fresh, net, opt, sched)

def count_steps(epochs, n, batch_size):
    """Return the optimizer steps of `epochs` over n examples."""
    return epochs * math.ceil(n / batch_size)

def warmup_then_decay(step, warmup, total):
    """Return the lr's factor: a linear warm-up (non-zero from step 0), then linear decay to 0."""
    return min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))

def check_loss(run, ema, bar, where):
    """Stop the run at a NaN loss before the weights get it (ema: the loss's moving average, a NaN
    stays in it), and show the loss."""
    value = float(run.reduce_mean(ema, 1))
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{where}: the loss is {value}; the usual cause is a learning rate too high "
            f"for this model (--lr {run.args.lr}), or bf16 overflow on GPU")
    bar.set_postfix(loss=f"{value:.4g}", refresh=False)

def evaluate(run, phase, epoch, student):
    """Add the dev metrics, {split: {metric: value}}, to run.history: for reporting only."""
    a = run.args
    student.eval()
    dev = {}
    for split in glue_data.get_task(a.task).dev:
        examples = run.data[split]
        logits = teachers.predict(student, run.tokenizer, examples, a.max_seq_len, run.device)
        dev[split] = glue_data.compute_metrics(a.task, logits, examples.labels)
    student.train()
    run.history.append({"phase": phase, "epoch": epoch, "dev": dev})
    print(f"{run.shown[phase]} epoch {epoch}: {glue_data.show(dev)}")

# ------------------------------------------------------------------------------------ resume
class Resume:
    """Exact resume: the checkpoint --resume goes on from, and those the run writes as it goes
    (rank 0), each holding all a run needs to go on from its next batch as if never killed."""

    def __init__(self, run):
        self.run = run
        self.path = os.path.join(run.args.out_dir, "resume.pt")
        glue_data.check_writable(run.args.out_dir, run.rank)
        self.loaded = load_checkpoint(self.path, run) if run.args.resume else None
        if self.loaded:
            run.history = self.loaded["history"]

    def restore(self, phase, parts):
        """Return (epoch, batch, step) where `phase` starts, None if it had finished before the run
        was killed. The checkpoint's states go back into parts (the sampler's for finished phases
        too)."""
        r = self.loaded
        if r is None or PHASES.index(r["phase"]) < PHASES.index(phase):
            return 1, 0, 0
        parts["sampler"].load_state_dict(r["sampler"])
        if r["phase"] != phase:
            return None
        for name, part in parts.items():
            if part is not None:
                part.load_state_dict(r[name])
        self.run.order.set_state(r["order"])
        torch.set_rng_state(r["rng"][self.run.rank])
        self.loaded = None
        print(f"resuming {phase} at epoch {r['epoch']}, batch {r['batch']}")
        return r["epoch"], r["batch"], r["step"]

    def checkpoint(self, parts, **where):
        """Write a checkpoint at `where` (phase, epoch, batch, step, the batch order's state)."""
        run = self.run
        rng = [torch.get_rng_state()] * run.world  # each rank's own (its dropout masks differ)
        if run.world > 1:
            dist.all_gather_object(rng, torch.get_rng_state())
        if run.rank > 0:
            return
        states = {name: part.state_dict() for name, part in parts.items() if part is not None}
        run_state = {"rng": rng, "world": run.world, "history": run.history,
                     "args": vars(run.args), "format": CHECKPOINT_FORMAT}
        state = where | states | run_state
        glue_data.write_atomic(self.path, lambda f: torch.save(state, f), binary=True)

    def finish(self):
        """The run is complete: nothing is left to resume."""
        if os.path.exists(self.path):
            os.remove(self.path)

def load_checkpoint(path, run):
    """Return the checkpoint --resume goes on from (None: none); one of other flags is refused."""
    if not os.path.isfile(path):
        print(f"note: nothing to resume in {run.args.out_dir}; starting afresh")
        return None
    try:
        r = torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is damaged ({str(e).splitlines()[0]}): rerun without "
                         f"--resume to start afresh, or delete it") from None
    other = differing_flags(r["args"], vars(run.args))
    if other:
        raise ValueError(f"{path} was written with other flags (--{', --'.join(other)}): "
                         f"rerun with the same flags, or without --resume")
    if r["world"] != run.world:
        raise ValueError(f"{path} was written by {r['world']} processes: resume with as many")
    if r.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by an older version of distill.py: delete it to "
                         f"start afresh")
    return r

CHECKPOINT_FORMAT = 2  # what resume.pt holds, and how: a checkpoint of another is refused
FREE_FLAGS = ("resume", "save_every")  # flags that change nothing of what a run computes

def differing_flags(these, those, free=FREE_FLAGS):
    """Return the flags ({flag: value}, as vars(args)) whose values `these` and `those` do not
    share; a flag one of them lacks (a newer flag) differs."""
    flags = list(these) + [k for k in those if k not in these]
    return [k for k in flags if k not in free and these.get(k) != those.get(k)]

if __name__ == "__main__":
    arguments = parse_args()
    if int(os.environ.get("RANK", 0)):  # under torchrun, rank 0 alone shows progress
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        main(arguments)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input: one sentence, no traceback
        sys.stderr = sys.__stderr__
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; to go on from the last checkpoint, "
                 "run the same command with --resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # A gloo thread may free the last barrier's tensor late, which needs the interpreter: one
        # already shutting down aborts (SIGABRT). All is written, so the worker skips the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
