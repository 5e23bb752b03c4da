"""AutoSKDBERT ("Learn to Stochastically Distill BERT"): the training loop.

    python distill.py --task RTE --strategy none --student <name or folder> --out_dir teachers/RTE/<name>
                                            # plain fine-tuning: makes one teacher of the team
    python distill.py --task RTE            # phase-1, teacher selection, phase-2, final student

Paper -> code (strategy auto):
  phase-1 optimization       phase1(): a student trains with teacher k ~ Categorical(p) at every step;
                             p is learned from the reward of each step (sampler.py)
  teacher selection          sampler.select_teachers(keep): discard the lightest teachers
  phase-2 optimization       phase2(): the same student and sampler go on over the kept teachers
  stochastic single-weight   sampler.update(k, reward): only the sampled teacher's weight moves
  final distillation         final(): a FRESH student distilled with the learned, frozen p; reported
The reward (--reward lookahead, the default): before each step, EVERY teacher is scored on the step's
batch by how much a step on its soft targets would lower the student's expected error on a held-out
slice of the TRAINING data (the --heldout fraction, never trained on in phases 1-2), to first order
(Loop.lookahead); the sampled teacher's advantage is its score minus the team's mean under p.
--reward step scores the drawn teacher alone: held-out loss before its step minus after it. The dev
set is only for reporting.

Comparison strategies on the same loop: uniform (SKD: p uniform and frozen), single (one teacher),
ensemble (the mean of all teachers' soft targets at every step), none (plain fine-tuning).

Data-parallel on N devices (nccl on GPUs, gloo on CPUs):  torchrun --nproc_per_node=N distill.py ...
Each rank takes a share of every batch and DDP averages the gradients; teacher and dev predictions are
made in shares and summed (all_reduce); the reward is averaged over ranks before the sampler sees it,
so every rank draws the same teacher (same seed); rank 0 alone writes files.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer

import glue_data
import model as kd
import teachers as team_lib
from sampler import TeacherSampler, check_keep

STRATEGIES = ("auto", "uniform", "single", "ensemble", "none")
PHASES = ("phase1", "phase2", "final")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, help="GLUE task: " + ", ".join(glue_data.TASKS))
    p.add_argument("--data_dir", default="glue_data", help="folder with <TASK>/train.tsv, dev.tsv")
    p.add_argument("--teachers", nargs="+", help="teacher checkpoints (default: every folder in teachers/<TASK>/)")
    p.add_argument("--student", help="pretrained checkpoint (default: the base model the teachers record)")
    p.add_argument("--student_layers", type=int, help="keep this many bottom layers (default: all)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    p.add_argument("--keep", type=int, help="teachers kept by selection (default: half the team, rounded up)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the final (reported) training")
    p.add_argument("--phase1_epochs", type=int, default=1)
    p.add_argument("--phase2_epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5, help="student learning rate (AdamW, linear decay)")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature T")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) loss")
    p.add_argument("--sampler_lr", type=float, default=0.1, help="learning rate of the teacher weights")
    p.add_argument("--sampler_warmup", type=int, default=0, help="first steps whose rewards only set the baseline")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of train held out for the reward")
    p.add_argument("--reward", default="lookahead", choices=("lookahead", "step"),
                   help="how a step's teacher is scored (see Loop.lookahead and Loop.probe)")
    p.add_argument("--probe_every", type=int, default=4, help="steps sharing one held-out reward batch")
    p.add_argument("--probe_size", type=int, help="examples in a held-out reward batch (default: --batch_size)")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", help="where results and the student go (default: runs/<TASK>-<strategy>-seed<N>)")
    p.add_argument("--cache_dir", default="cache", help="where teacher outputs are cached")
    p.add_argument("--resume", action="store_true", help="continue a killed run from <out_dir>/resume.pt")
    p.add_argument("--save_every", type=int, default=500, help="steps between resume checkpoints (and every epoch end)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or f"runs/{args.task}-{args.strategy}-seed{args.seed}"
    for name, ok in [("batch_size", args.batch_size >= 1), ("epochs", args.epochs >= 1),
                     ("temperature", args.temperature > 0), ("alpha", 0 <= args.alpha <= 1),
                     ("heldout", 0 < args.heldout < 1), ("probe_every", args.probe_every >= 1),
                     ("probe_size", args.probe_size is None or args.probe_size >= 1),
                     ("save_every", args.save_every >= 1), ("sampler_warmup", args.sampler_warmup >= 0)]:
        if not ok:
            p.error(f"--{name} {getattr(args, name)} is out of range")
    return args


# ------------------------------------------------------------------------------- the training loop
def init_distributed():
    """(rank, world size, device); under torchrun, join the process group first."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


class Loop:
    """What every phase shares: the task's data, encoded once for the student, and the device."""

    def __init__(self, args, data, tokenizer):
        self.args, self.data, self.tokenizer = args, data, tokenizer
        self.rank, self.world, self.device = init_distributed()
        self.clock = time.process_time if self.device.type == "cpu" else time.perf_counter  # (CPU: steal-proof)
        self.enc = glue_data.encode(tokenizer, data["train"], args.max_seq_len)  # [N] token ids
        self.lengths = torch.tensor(glue_data.lengths(self.enc))  # [N]
        regression = glue_data.get_task(args.task).labels is None
        self.labels = torch.tensor(data["train"].labels, dtype=torch.float if regression else torch.long,
                                   device=self.device)  # [N]
        self.order = torch.Generator().manual_seed(args.seed)  # batch order
        self.history, self.record, self.timings = [], {}, {}   # what metrics/distribution.json report
        self.resume_path, self.resume = os.path.join(args.out_dir, "resume.pt"), None

    def batch(self, idx):
        """Examples idx on the device: {token tensor name: [B, L], "idx": [B]} (GPU: no host sync)."""
        b = glue_data.collate(self.enc, idx, self.tokenizer.pad_token_id or 0) | {"idx": torch.tensor(idx)}
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in b.items()}
        return b

    def new_student(self, base):
        """A fresh student; self.net is what the training step calls (under torchrun, DDP around it)."""
        torch.manual_seed(self.args.seed)  # the new head and dropout repeat with the seed
        labels = glue_data.get_task(self.args.task).labels
        student = kd.build_student(base, labels, self.args.student_layers, self.args.task)[0].to(self.device)
        if self.rank:
            torch.manual_seed(self.args.seed + 1000 * self.rank)  # each rank its own dropout masks
        self.net = torch.nn.parallel.DistributedDataParallel(student, broadcast_buffers=False) if self.world > 1 else student
        return student

    def reduce_mean(self, value, n):
        """Mean over all ranks of a per-rank mean (a tensor) of n examples (the value itself in one process)."""
        if self.world == 1:
            return value
        t = torch.cat([value.detach().float().reshape(-1) * n, torch.tensor([float(n)], device=value.device)])
        dist.all_reduce(t)
        return (t[:-1] / t[-1]).reshape(value.shape)

    def optimizer(self, student, epochs, n_train):
        steps = epochs * math.ceil(n_train / self.args.batch_size)
        opt = torch.optim.AdamW(student.parameters(), lr=self.args.lr, weight_decay=0.01)
        warmup = max(1, steps // 10)  # 10% linear warm-up, then linear decay to 0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
        return opt, sched

    def logits(self, student, idx):
        """The student's outputs on the examples idx, [B, C] float32, and idx on the device [B]."""
        b = self.batch(idx)
        i = b.pop("idx")
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            return student(**b).logits.float(), i

    def loss(self, student, idx, soft_k):
        """KD loss of the examples idx; soft_k [N, C] one teacher's soft targets on the device, or None."""
        logits, i = self.logits(student, idx)
        return kd.kd_loss(logits, self.labels[i], soft_k[i] if soft_k is not None else None,
                          self.args.temperature, self.args.alpha)

    @torch.no_grad()
    def probe(self, student, idx):
        """The reward's measurement: hard-label loss on held-out examples, no dropout (a host sync)."""
        student.eval()
        mine = idx[self.rank::self.world]
        loss = self.loss(student, mine, None) if mine else torch.zeros((), device=self.device)
        loss = float(self.reduce_mean(loss, len(mine)))
        student.train()
        return loss

    def heldout_grad(self, student, idx):
        """h: the gradient of the student's expected error on held-out examples (no dropout) over its
        weights, averaged over ranks, flat [P]: the direction the lookahead reward scores steps against."""
        params, mine = [p for p in student.parameters() if p.requires_grad], idx[self.rank::self.world]
        grads = [None] * len(params)
        student.eval()
        if mine:
            logits, i = self.logits(student, mine)
            grads = torch.autograd.grad(kd.expected_error(logits, self.labels[i]), params, allow_unused=True)
        student.train()
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        return self.reduce_mean(flat, len(mine))

    @torch.no_grad()
    def lookahead(self, student, idx, soft, h, lr):
        """Every teacher's reward on this batch, [K]: how much a step of size lr on its soft targets
        would lower the held-out expected error E (heldout_grad), to first order. Teacher j's step is
        -lr * g_j, so the drop is

            r_j = lr * <h, g_j> = lr * <J h, dL_j/dz>,     g_j = J^T dL_j/dz,  J = dz/dtheta

        with z [B, C] the batch's logits. Teachers differ only in dL_j/dz, so ONE product J h (a central
        difference of two forwards along h, no dropout, fp32) scores the whole team on the same batch
        and the same held-out examples.
        """
        b = self.batch(idx)
        i = b.pop("idx")
        names, params = zip(*[(n, p) for n, p in student.named_parameters() if p.requires_grad])  # as in h
        hs = [v.view_as(p) for v, p in zip(h.split([p.numel() for p in params]), params)]
        eps = 1e-4 / float((h * h).sum().clamp_min(1e-12))  # a step along h that moves E by 1e-4
        student.eval()
        with torch.autocast(self.device.type, enabled=False):  # (bf16 would drown the difference)
            z_plus, z_minus = (torch.func.functional_call(student, {n: p.add(v, alpha=s) for n, p, v in zip(
                names, params, hs)}, kwargs=b).logits.float() for s in (eps, -eps))
        student.train()
        jh, z = (z_plus - z_minus) / (2 * eps), ((z_plus + z_minus) / 2).requires_grad_()  # [B, C]; z to O(eps^2)
        with torch.enable_grad():
            dz = torch.stack([torch.autograd.grad(kd.kd_loss(z, self.labels[i], s[i], self.args.temperature,
                                                             self.args.alpha), z)[0] for s in soft])  # [K, B, C]
        return self.reduce_mean(lr * (dz * jh).sum((1, 2)), 1)  # DDP averages the ranks' gradients alike

    def finite(self, loss, where):
        """The loss as a float, or stop before it reaches the weights (averaged over ranks)."""
        value = float(self.reduce_mean(loss, 1))
        if not math.isfinite(value):
            raise FloatingPointError(f"{where}: the loss is {value}; the usual cause is a learning rate too high "
                                     f"for this model (--lr {self.args.lr}), or bf16 overflow on GPU")
        return value

    def train(self, phase, student, opt, sched, epochs, train_idx, soft, sampler=None, heldout=None):
        """Train student for epochs over train_idx; soft [K, N, C] team soft targets (None: no KD).

        Each step uses teacher k ~ sampler (k = 0 without one). With heldout, the sampler LEARNS from
        a held-out batch kept for probe_every steps. --reward lookahead scores every teacher on the
        step's batch before the step (lookahead()); --reward step measures the drawn teacher alone:
        the probe loss before the step minus after it (the loss after one step is the loss before the next).
        """
        r, start, skip, step, before = self.resume, 1, 0, 0, None  # before: h, or the probe loss
        if r and PHASES.index(r["phase"]) > PHASES.index(phase):
            return  # this phase had finished before the run was killed
        if r and r["phase"] == phase:  # continue from the checkpoint, exactly
            student.load_state_dict(r["student"]), opt.load_state_dict(r["opt"]), sched.load_state_dict(r["sched"])
            self.order.set_state(r["order"]), torch.set_rng_state(r["rng"])
            start, skip, step, before, self.resume = r["epoch"], r["batch"], r["step"], r.get("before"), None
        student.train()
        probes = glue_data.batches(self.lengths[heldout], self.args.probe_size or self.args.batch_size) \
            if heldout is not None else []
        lookahead = bool(probes) and self.args.reward == "lookahead"
        status, ema = {"loss": float("nan")}, None
        for epoch in range(start, epochs + 1):
            t, order_state = self.clock(), self.order.get_state()  # (to redraw this epoch's batches on resumption)
            order = glue_data.batches(self.lengths[train_idx], self.args.batch_size, self.order)
            for i, b in enumerate(glue_data.progress(order[skip:], f"{phase} epoch {epoch}/{epochs}", status), skip):
                if len(b) < self.world:
                    continue  # a last batch too small to give every rank an example
                idx = train_idx[b].tolist()[self.rank::self.world]  # this rank's share of the batch
                if probes and (step % self.args.probe_every == 0 or before is None):
                    probe_idx = heldout[probes[(step // self.args.probe_every) % len(probes)]].tolist()
                    before = (self.heldout_grad if lookahead else self.probe)(student, probe_idx)
                if lookahead:
                    rewards = self.lookahead(student, idx, soft, before, opt.param_groups[0]["lr"]).tolist()
                k = sampler.sample() if sampler else 0
                loss = self.loss(self.net, idx, soft[k] if soft is not None else None)
                ema = loss.detach() if ema is None else 0.98 * ema + 0.02 * loss.detach()  # NaN stays NaN
                save = (step + 1) % self.args.save_every == 0
                # On CPU, read the loss every step; on GPU, every 50 steps and before each checkpoint.
                if self.device.type == "cpu" or step % 50 == 0 or save or i == len(order) - 1:
                    status["loss"] = self.finite(ema, f"{phase} epoch {epoch} step {step + 1}")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
                if probes and not lookahead:
                    after = self.probe(student, probe_idx)
                    rewards, before = before - after, after
                if probes:
                    sampler.update(k, rewards)
                step += 1
                if save:
                    self.checkpoint(phase, epoch, i + 1, step, order_state, student, opt, sched, sampler, before)
            skip = 0
            T = self.timings  # the training steps alone, for bench.py --speed (on CPU: process CPU time)
            T[phase + "_steps"], T[phase + "_steps_s"] = step, T.get(phase + "_steps_s", 0) + self.clock() - t
            self.evaluate(phase, epoch, student)
            self.checkpoint(phase, epoch + 1, 0, step, self.order.get_state(), student, opt, sched, sampler, before)

    def checkpoint(self, phase, epoch, batch, step, order_state, student, opt, sched, sampler, before):
        """Everything --resume needs to go on from the next batch as if never killed (rank 0 writes)."""
        if self.rank:
            return
        state = {"phase": phase, "epoch": epoch, "batch": batch, "step": step, "order": order_state,
                 "rng": torch.get_rng_state(), "student": student.state_dict(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "sampler": sampler.state_dict() if sampler else None, "before": before,
                 "history": self.history, "dist": self.record, "timings": self.timings, "args": vars(self.args)}
        torch.save(state, self.resume_path + ".tmp")
        os.replace(self.resume_path + ".tmp", self.resume_path)

    def load_checkpoint(self):
        """Read resume.pt (if any) written with the same flags; the phases pick up their part in train()."""
        if not os.path.isfile(self.resume_path):
            print(f"note: nothing to resume in {self.args.out_dir}; starting afresh")
            return
        r = torch.load(self.resume_path, weights_only=True)
        other = [k for k, v in r["args"].items() if k not in ("resume", "save_every") and vars(self.args).get(k) != v]
        if other:
            raise ValueError(f"{self.resume_path} was written with other flags (--{', --'.join(other)}): "
                             f"rerun with the same flags, or without --resume")
        self.resume, self.history, self.record, self.timings = r, r["history"], r["dist"], r["timings"]
        print(f"resuming {r['phase']} at epoch {r['epoch']}, batch {r['batch']}")

    def evaluate(self, phase, epoch, student):
        """Dev metrics, for reporting only: {split: {metric: value}}."""
        student.eval()
        dev = {s: glue_data.compute_metrics(self.args.task, team_lib.predict(
            student, self.tokenizer, ex, self.args.max_seq_len, self.device), ex.labels)
            for s, ex in self.data.items() if s != "train"}
        student.train()
        self.history.append({"phase": phase, "epoch": epoch, "dev": dev})
        print(f"{phase} epoch {epoch}: " + ", ".join(
            f"{s} {m} {v:.4f}" for s, ms in dev.items() for m, v in ms.items()))


# ------------------------------------------------------------------------------- AutoSKD's phases
def phase1(loop, base, soft, sampler, train_idx, heldout):
    """Phase-1 optimization: learn p over the whole team while a student trains with it."""
    student, a = loop.new_student(base), loop.args
    opt, sched = loop.optimizer(student, a.phase1_epochs + a.phase2_epochs, len(train_idx))
    loop.train("phase1", student, opt, sched, a.phase1_epochs, train_idx, soft, sampler, heldout)
    return student, opt, sched


def phase2(loop, student, opt, sched, soft, sampler, train_idx, heldout):
    """Phase-2 optimization: the same student and schedule go on; p is refined over the kept teachers."""
    loop.train("phase2", student, opt, sched, loop.args.phase2_epochs, train_idx, soft, sampler, heldout)


def final(loop, base, soft, sampler):
    """The reported student: fresh, trained on all of train, drawing teachers from the frozen p.

    Without a sampler every step uses soft[0]: the one teacher (single), the team's mean (ensemble).
    """
    student = loop.new_student(base)
    all_idx = torch.arange(len(loop.labels))
    opt, sched = loop.optimizer(student, loop.args.epochs, len(all_idx))
    loop.train("final", student, opt, sched, loop.args.epochs, all_idx, soft, sampler)
    return student


def learn_distribution(loop, base, soft, sampler, keep):
    """AutoSKD before the final student: phase-1, teacher selection, phase-2; recorded in loop.record."""
    split = torch.randperm(len(loop.labels), generator=torch.Generator().manual_seed(loop.args.seed))
    n_held = max(1, int(loop.args.heldout * len(split)))
    heldout, train_idx = split[:n_held], split[n_held:]  # the reward's examples, never trained on here
    record, t = loop.record, time.time()
    student, opt, sched = phase1(loop, base, soft, sampler, train_idx, heldout)
    if "discarded" not in record:  # (a resumed run may have selected already)
        record["phase1"], loop.timings["phase1_s"] = list(sampler.trace), time.time() - t
        record["discarded"] = sampler.select_teachers(keep)
        print(f"teacher selection: kept {[n for n, a in zip(sampler.names, sampler.active) if a]}, "
              f"discarded {record['discarded']}")
    t = time.time()
    phase2(loop, student, opt, sched, soft, sampler, train_idx, heldout)
    record["phase2"], loop.timings["phase2_s"] = sampler.trace[len(record["phase1"]):], time.time() - t
    record["rewards"] = sampler.rewards  # [teacher index, reward] of every step of phase-1, then phase-2


# ------------------------------------------------------------------------------- the command
def resolve_team(args):
    """Teacher checkpoints to use (empty for --strategy none) and the student checkpoint."""
    if args.strategy == "none":
        if not args.student:
            raise ValueError("--strategy none fine-tunes --student: name a pretrained checkpoint (hub name or folder)")
        return [], args.student
    default_dir = os.path.join("teachers", args.task)
    # Sorted, so that the order in which the team is named decides nothing (a draw picks by position).
    names = sorted(args.teachers or team_lib.find_teachers(default_dir))
    if not names:
        raise ValueError(f"no teachers in {default_dir}/: make each with `python distill.py --task "
                         f"{args.task} --strategy none --student <name or folder> --out_dir "
                         f"{default_dir}/<name>`, or pass --teachers DIR [DIR ...]")
    if args.strategy == "single" and len(names) != 1:
        raise ValueError(f"--strategy single distils from one teacher; {len(names)} given: name one with --teachers DIR")
    student = args.student
    if not student:
        bases = [getattr(AutoConfig.from_pretrained(team_lib.local_folder(n)), "base_model", None)
                 for n in names]
        student = next((b for b in bases if b), None)
        if not student:
            raise ValueError("the teachers do not record the checkpoint they were fine-tuned from: "
                             "pass --student <name or folder>")
        print(f"student: {student} (the base model the teachers were fine-tuned from)")
    return names, student


def save_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def save_student(student, tokenizer, out_dir):
    """save_pretrained into a temporary folder, then move each file into out_dir."""
    tmp = os.path.join(out_dir, ".student.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    os.rmdir(tmp)


def main(args):
    t0 = time.time()
    data = glue_data.load_task(args.data_dir, args.task)
    names, base = resolve_team(args)
    kd.layers_to_keep(base, args.student_layers)  # fail now, not after the teachers have run
    keep = args.keep if args.keep is not None else math.ceil(len(names) / 2)
    if args.strategy == "auto":
        check_keep(keep, len(names))  # now, not after the teachers have run
    tokenizer = AutoTokenizer.from_pretrained(base)
    loop = Loop(args, data, tokenizer)
    probe = os.path.join(args.out_dir, f".write_test{loop.rank}")
    try:  # write a probe file: permission bits say nothing to root or on a read-only disk
        os.makedirs(args.out_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out_dir {args.out_dir} is not writable ({e.strerror})") from None
    if args.resume:
        loop.load_checkpoint()
    team = team_lib.load_team(names, args.task, args.data_dir, data, args.max_seq_len, args.cache_dir,
                              loop.device) if names else []
    timings, record = loop.timings, loop.record
    timings.setdefault("teachers_s", time.time() - t0)
    record["teachers"] = names
    soft = torch.stack([kd.soft_targets(t.train, args.temperature) for t in team]).to(loop.device) if team else None  # [K, N, C]

    sampler = None
    if args.strategy == "ensemble":
        soft, record["final"] = soft.mean(0, keepdim=True), [1 / len(team)] * len(team)
    elif args.strategy in ("auto", "uniform"):
        sampler = TeacherSampler(names, lr=args.sampler_lr, seed=args.seed, warmup=args.sampler_warmup)
        if loop.resume:
            sampler.load_state_dict(loop.resume["sampler"])
    if args.strategy == "auto":
        learn_distribution(loop, base, soft, sampler, keep)
    if sampler:
        record["final"] = sampler.probs().tolist()
        print("final distribution: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, record["final"])))
    elif args.strategy == "single":
        record["final"] = [1.0]

    t = time.time()
    student = final(loop, base, soft, sampler)
    timings["final_s"] = time.time() - t
    dev = loop.history[-1]["dev"]
    timings["total_s"] = time.time() - t0
    if loop.rank:
        return  # rank 0 writes
    save_student(student, tokenizer, args.out_dir)
    save_json({"task": args.task, "strategy": args.strategy, "seed": args.seed, "dev": dev,
               "score": glue_data.score(dev), "history": loop.history, "timings": timings,
               "teachers": {t.name: t.dev_metrics for t in team}, "args": vars(args)},
              os.path.join(args.out_dir, "metrics.json"))
    if names:
        save_json(record, os.path.join(args.out_dir, "distribution.json"))
    if os.path.exists(loop.resume_path):
        os.remove(loop.resume_path)  # the run is complete
    print(f"done in {timings['total_s']:.0f}s: dev score {glue_data.score(dev):.4f}; wrote {args.out_dir}")


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
        sys.exit("interrupted; to go on from the last checkpoint, run the same command with --resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
