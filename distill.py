"""AutoSKDBERT ("Learn to Stochastically Distill BERT"): the training loop.

    python distill.py --task RTE --strategy none --student <name or folder> --out_dir teachers/RTE/<name>
    python distill.py --task RTE                  # phase-1, teacher selection, phase-2, final student
    torchrun --nproc_per_node=N distill.py --task RTE      # data-parallel: nccl on GPUs, gloo on CPUs

The first command fine-tunes one teacher of the team. Read from main(): data, team, each strategy's
teaching (setup), then autoskd(): phase-1, teacher selection, phase-2 and the final, reported student.
A step (Loop.train): k ~ Categorical(p), the KD loss on teacher k's soft targets, an optimizer step,
the reward (class Reward, on held-out TRAINING examples; dev is for reporting only), and
sampler.update(k, reward), which moves theta_k alone. Under torchrun each rank takes a share of
every batch, rewards are averaged over ranks so every rank draws the same teacher, rank 0 writes.
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

import glue_data
import model as kd
import teachers as team_lib
from sampler import TeacherSampler, check_keep

STRATEGIES = ("auto", "uniform", "skd", "single", "ensemble", "none")
PHASES = ("phase1", "phase2", "final")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, help="GLUE task: " + ", ".join(glue_data.TASKS))
    p.add_argument("--data_dir", default="glue_data", help="folder with <TASK>/train.tsv, dev.tsv")
    p.add_argument("--teachers", nargs="+", help="teacher checkpoints (default: every folder in teachers/<TASK>/)")
    p.add_argument("--team", help="with no teachers in teachers/<TASK>/, the recipe fine-tuned there "
                   "first: small (default; minutes on a CPU) or paper (a GPU's hours)")
    p.add_argument("--student", help="pretrained checkpoint (default: the base model the teachers record)")
    p.add_argument("--student_layers", type=int, help="keep this many bottom layers (default: all)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    p.add_argument("--keep", type=int, help="teachers kept by selection (default: half the team, rounded up)")
    p.add_argument("--weights", type=float, nargs="+", help="--strategy skd: p over the sorted team "
                   "(default: teacher-rank, from the teachers' dev scores)")
    p.add_argument("--transfer", help="unlabelled examples in the task's test-file format, distilled on "
                   "by every strategy with a teacher")
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
    p.add_argument("--reward", default="lookahead", choices=("lookahead", "step"), help="see class Reward")
    p.add_argument("--probe_every", type=int, default=4, help="steps sharing one held-out reward batch")
    p.add_argument("--probe_size", type=int, help="examples in a held-out reward batch (default: --batch_size)")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", help="where results and the student go (default: runs/<TASK>-<strategy>-seed<N>)")
    p.add_argument("--cache_dir", default="cache", help="where teacher outputs are cached")
    p.add_argument("--resume", action="store_true", help="continue a killed run from <out_dir>/resume.pt")
    p.add_argument("--save_every", type=int, default=500, help="steps between resume checkpoints (and every epoch end)")
    p.add_argument("--predict_test", action="store_true", help="write the final student's test predictions for GLUE")
    a = p.parse_args(argv)
    a.out_dir = a.out_dir or f"runs/{a.task}-{a.strategy}-seed{a.seed}"
    for name, ok in [("batch_size", a.batch_size >= 1), ("epochs", a.epochs >= 1), ("temperature", a.temperature > 0),
                     ("alpha", 0 <= a.alpha <= 1), ("heldout", 0 < a.heldout < 1), ("probe_every", a.probe_every >= 1),
                     ("probe_size", (a.probe_size or 1) >= 1), ("save_every", a.save_every >= 1),
                     ("sampler_warmup", a.sampler_warmup >= 0)]:
        if not ok:
            p.error(f"--{name} {getattr(a, name)} is out of range")
    return a

def main(args):
    t0 = time.time()
    metrics = os.path.join(args.out_dir, "metrics.json")
    if args.resume and os.path.isfile(metrics) and not os.path.isfile(os.path.join(args.out_dir, "resume.pt")):
        print(f"{args.out_dir} holds a finished run ({metrics}): nothing to resume; its results are left as they are")
        return
    fetch_missing_data(args)
    data = glue_data.load_task(args.data_dir, args.task)
    transfer = load_transfer(args)
    test = glue_data.load_task(args.data_dir, args.task, test=True) if args.predict_test else {}  # a bad row stops us now
    names, base = resolve_team(args)
    check_skd_weights(args, names)
    kd.layers_to_keep(base, args.student_layers)  # fail now, not after the teachers have run
    keep = args.keep if args.keep is not None else math.ceil(len(names) / 2)
    if args.strategy == "auto":
        check_keep(keep, len(names))
    tokenizer = AutoTokenizer.from_pretrained(base)
    loop = Loop(args, data, tokenizer, transfer)
    teacher_data = data | ({"transfer": transfer} if transfer else {})
    team = team_lib.load_team(names, args.task, teacher_data, args.max_seq_len, args.cache_dir,
                              loop.device) if names else []
    loop.timings["teachers_s"] = time.time() - t0
    soft, sampler = setup(args, team, loop.device)
    student = autoskd(loop, base, soft, sampler, keep)
    student.eval()
    test = {s: glue_data.label_texts(args.task, team_lib.predict(student, tokenizer, ex, args.max_seq_len, loop.device))
            for s, ex in test.items()}  # (every rank takes part)
    loop.timings["total_s"] = time.time() - t0
    if loop.rank == 0:  # rank 0 writes
        save(loop, student, team, sampler, test)
    if loop.world > 1:
        dist.barrier()  # the ranks end together: one torn down while another still runs can abort

def setup(args, team, device):
    """Each strategy's teaching, in one place: (soft targets [K, N, C] or None, sampler or None).
    A step distils from soft[k], k drawn from the sampler (k = 0 without one)."""
    if not team:
        return None, None  # none: the labels alone
    soft = torch.stack([kd.soft_targets(t.train, args.temperature) for t in team]).to(device)  # [K, N, C]
    if args.strategy == "ensemble":
        return soft.mean(0, keepdim=True), None  # the team's mean soft targets, at every step
    if args.strategy == "single":
        return soft, None
    sampler = TeacherSampler([t.name for t in team], lr=args.sampler_lr, seed=args.seed, warmup=args.sampler_warmup)
    if args.strategy == "skd":  # SKDBERT: a fixed p, p_k = w_k / sum_j w_j
        weights = args.weights or teacher_rank([glue_data.score(t.dev_metrics) for t in team])
        sampler.theta = torch.tensor(weights, dtype=torch.float64).log()
        print("skd distribution: " + ", ".join(f"{t.name} {p:.3f}" for t, p in zip(team, sampler.probs())))
    return soft, sampler  # auto: p is learned; uniform and skd: p stays as it is

def teacher_rank(scores):
    """SKDBERT's teacher-rank distribution, as we read it (its formula could not be read here): rank
    the teachers 1 (worst) to K (best) by their scores, ties sharing the mean rank; p_k = rank_k /
    sum_j rank_j."""
    ranks = glue_data.ranks(scores)
    return [r / sum(ranks) for r in ranks]

def autoskd(loop, base, soft, sampler, keep):
    """AutoSKD. With --strategy auto, p is learned first, on a student used for nothing else:
    phase-1 over the whole team, teacher selection, phase-2 over the kept teachers, with rewards on
    held-out labelled examples. Then the final student, the one reported (every strategy): fresh, on
    all of train (and the transfer set), drawing its teachers from the frozen p."""
    a = loop.args
    n = loop.n_labelled  # train's examples; those of the transfer set follow them
    everything = torch.arange(len(loop.labels))  # [N + M]
    if a.strategy == "auto":
        split = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed))
        n_held = max(1, int(a.heldout * n))
        heldout = split[:n_held]  # the reward's examples, never trained on in phases 1-2
        train_idx = torch.cat([split[n_held:], everything[n:]])
        reward = Reward(loop, heldout, soft)
        student, opt, sched = loop.new_student(base, a.phase1_epochs + a.phase2_epochs, len(train_idx))
        loop.train("phase1", student, opt, sched, a.phase1_epochs, train_idx, soft, sampler, reward)
        sampler.select_teachers(keep)  # teacher selection, by the phase-1 evidence
        show_selection(sampler)
        loop.train("phase2", student, opt, sched, a.phase2_epochs, train_idx, soft, sampler, reward)
    student, opt, sched = loop.new_student(base, a.epochs, len(everything))
    loop.train("final", student, opt, sched, a.epochs, everything, soft, sampler)  # p frozen: no reward
    return student

def show_selection(sampler):
    """Each teacher's phase-1 evidence, its p after phase-1 and what selection made of it."""
    print("teacher selection by mean phase-1 advantage (reward: mean ± standard error, n steps):")
    for t in sampler.record()["selection"]:
        verdict = "kept     " if t["kept"] else "discarded"
        if t["n"] == 0:
            print(f"  {verdict} {t['teacher']}: never measured, p {t['p']:.3f}")
            continue
        se = f"{t['reward_se']:.1e}" if t["reward_se"] is not None else "-"
        print(f"  {verdict} {t['teacher']}: reward {t['reward']:+.3e} ± {se} (n {t['n']}), p {t['p']:.3f}")

# ------------------------------------------------------------------------------- the training loop
def warmup_then_decay(step, warmup, total):
    """The learning rate's factor: linear warm-up (non-zero from the first step), then decay to 0 at total."""
    return min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))

class Loop:
    """What every phase shares: the task's data, encoded once for the student, the device and ranks."""

    def __init__(self, args, data, tokenizer, transfer=None):
        self.args, self.data, self.tokenizer = args, data, tokenizer
        world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = (dist.get_rank() if world > 1 else 0), world
        self.clock = time.process_time if self.device.type == "cpu" else time.perf_counter  # (CPU: steal-proof)
        # The training examples: the N labelled ones of train, then the M of the transfer set if any.
        train = data["train"]
        examples = glue_data.concat(train, transfer) if transfer else train
        self.n_labelled = len(train)
        self.enc = glue_data.encode(tokenizer, examples, args.max_seq_len)  # [N + M] token ids
        self.lengths = torch.tensor(glue_data.lengths(self.enc))  # [N + M]
        labels = train.labels + [0] * (len(examples) - len(train))  # a transfer example's: unused
        self.labels = torch.tensor(labels, device=self.device)  # [N + M] long; STS-B: float
        self.labelled = torch.arange(len(examples), device=self.device) < len(train)  # [N + M]
        self.order = torch.Generator().manual_seed(args.seed)  # batch order
        self.timings = {}  # timings (since this process started) go to metrics.json
        try:  # write a file: permission bits say nothing to root or on a read-only disk
            os.makedirs(args.out_dir, exist_ok=True)
            open(probe := os.path.join(args.out_dir, f".write_test{self.rank}"), "w").close()
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"--out_dir {args.out_dir} is not writable ({e.strerror})") from None
        self.resume_path = os.path.join(args.out_dir, "resume.pt")
        self.resume = self.load_checkpoint() if args.resume else None
        self.history = self.resume["history"] if self.resume else []  # dev metrics after every epoch

    def new_student(self, base, epochs, n_train):
        """A fresh student, its AdamW and schedule; self.net is what a step calls (under torchrun, DDP)."""
        torch.manual_seed(self.args.seed)  # the new head and dropout repeat with the seed
        labels = glue_data.get_task(self.args.task).labels
        student = kd.build_student(base, labels, self.args.student_layers, self.args.task)[0].to(self.device)
        if self.rank:
            torch.manual_seed(self.args.seed + 1000 * self.rank)  # each rank its own dropout masks
        self.net = torch.nn.parallel.DistributedDataParallel(student, broadcast_buffers=False) if self.world > 1 else student
        steps = epochs * math.ceil(n_train / self.args.batch_size)
        opt = torch.optim.AdamW(student.parameters(), lr=self.args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_then_decay(s, max(1, steps // 10), steps))
        return student, opt, sched

    def batch(self, idx):
        """Examples idx on the device: ({token tensor name: [B, L]}, idx [B]) (GPU: pinned, no host sync)."""
        b = glue_data.collate(self.tokenizer, self.enc, idx) | {"idx": torch.tensor(idx)}
        if self.device.type == "cuda":
            b = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in b.items()}
        return b, b.pop("idx")

    def logits(self, student, idx):
        """The student's outputs on the examples idx, [B, C] float32, and idx on the device [B]."""
        b, i = self.batch(idx)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            return student(**b).logits.float(), i

    def loss(self, student, idx, soft_k):
        """KD loss of the examples idx; soft_k [N, C]: one teacher's soft targets, or None (labels only)."""
        logits, i = self.logits(student, idx)
        return kd.kd_loss(logits, self.labels[i], soft_k[i] if soft_k is not None else None,
                          self.args.temperature, self.args.alpha, self.labelled[i])

    def reduce_mean(self, value, n):
        """Mean over ranks of a per-rank mean (a tensor of any shape) of n examples."""
        if self.world == 1:
            return value
        t = torch.cat([value.detach().float().reshape(-1) * n, torch.tensor([float(n)], device=value.device)])
        dist.all_reduce(t)
        return (t[:-1] / t[-1]).reshape(value.shape)

    def train(self, phase, student, opt, sched, epochs, train_idx, soft, sampler=None, reward=None):
        """Train student for `epochs` over train_idx. Every step: teacher k ~ Categorical(p) (k = 0
        without a sampler), the KD loss on soft[k] (soft [K, N, C]; None: the labels alone), an AdamW
        step; with a reward (phases 1-2), the sampler learns from it."""
        parts = {"student": student, "opt": opt, "sched": sched, "sampler": sampler, "reward": reward}
        start = self.restore(phase, parts)
        if start is None:
            return  # the phase had finished before the run was killed
        first, skip, step = start
        self.ema = None  # the loss shown and checked for NaN: a moving average over this phase's steps
        student.train()  # dropout on: from_pretrained hands over a model in eval mode
        for epoch in range(first, epochs + 1):
            t, order_state = self.clock(), self.order.get_state()  # (to redraw the epoch's batches on resume)
            order = glue_data.batches(self.lengths[train_idx], self.args.batch_size, self.order)
            bar = tqdm(order[skip:], f"{phase} epoch {epoch}/{epochs}", len(order), initial=skip, mininterval=1)
            for i, b in enumerate(bar, skip):
                if len(b) < self.world:
                    continue  # a last batch too small to give every rank an example
                idx = train_idx[b].tolist()[self.rank::self.world]  # this rank's share of the batch
                k = sampler.sample() if sampler else 0
                if reward:
                    reward.before(student, idx, step, opt.param_groups[0]["lr"])
                loss = self.loss(self.net, idx, soft[k] if soft is not None else None)
                save = (step + 1) % self.args.save_every == 0
                self.step(loss, parts, bar, f"{phase} epoch {epoch} step {step + 1}", save or i == len(order) - 1)
                if reward:
                    sampler.update(k, reward.after(student, step))  # only theta_k moves
                step += 1
                if save:
                    self.checkpoint(parts, phase=phase, epoch=epoch, batch=i + 1, step=step, order=order_state)
            skip, T = 0, self.timings  # T: the training steps alone, for bench.py --speed
            T[phase + "_steps"], T[phase + "_steps_s"] = step, T.get(phase + "_steps_s", 0) + self.clock() - t
            self.evaluate(phase, epoch, student)
            self.checkpoint(parts, phase=phase, epoch=epoch + 1, batch=0, step=step, order=self.order.get_state())

    def step(self, loss, parts, bar, where, read):
        """Backward, clip, AdamW and schedule steps. A NaN loss stops the run before it reaches the
        weights: the loss is read on the host every step on CPU; on GPU every 50 steps and when `read`."""
        self.ema = loss.detach() if self.ema is None else 0.98 * self.ema + 0.02 * loss.detach()  # NaN stays
        if self.device.type == "cpu" or bar.n % 50 == 0 or read:
            value = float(self.reduce_mean(self.ema, 1))
            if not math.isfinite(value):
                raise FloatingPointError(f"{where}: the loss is {value}; the usual cause is a learning rate too "
                                         f"high for this model (--lr {self.args.lr}), or bf16 overflow on GPU")
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts["student"].parameters(), 1.0)
        parts["opt"].step(), parts["sched"].step(), parts["opt"].zero_grad(set_to_none=True)

    def evaluate(self, phase, epoch, student):
        """Dev metrics, for reporting only: {split: {metric: value}}."""
        student.eval()
        dev = {s: glue_data.compute_metrics(self.args.task, team_lib.predict(
            student, self.tokenizer, ex, self.args.max_seq_len, self.device), ex.labels)
            for s, ex in self.data.items() if s != "train"}
        student.train()
        self.history.append({"phase": phase, "epoch": epoch, "dev": dev})
        print(f"{phase} epoch {epoch}: {glue_data.show(dev)}")

    # ------------------------------------------------------------------ resume: all of it
    def checkpoint(self, parts, **where):
        """Everything --resume needs to go on from the next batch as if never killed (rank 0 writes)."""
        rng = [torch.get_rng_state()] * self.world  # each rank's own (its dropout masks differ)
        if self.world > 1:
            dist.all_gather_object(rng, torch.get_rng_state())
        if self.rank == 0:
            state = where | {n: p.state_dict() for n, p in parts.items() if p is not None} | {
                "rng": rng, "world": self.world, "history": self.history, "args": vars(self.args)}
            glue_data.write_atomic(self.resume_path, lambda f: torch.save(state, f), binary=True)

    def load_checkpoint(self):
        """The checkpoint --resume goes on from, refused when written with other flags; None: none."""
        path, args = self.resume_path, self.args
        if not os.path.isfile(path):
            print(f"note: nothing to resume in {args.out_dir}; starting afresh")
            return None
        try:
            r = torch.load(path, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is damaged ({str(e).splitlines()[0]}): rerun without --resume to start afresh, "
                             f"or delete it") from None
        other = [k for k, v in r["args"].items() if k not in ("resume", "save_every") and vars(args).get(k) != v]
        if other:
            raise ValueError(f"{path} was written with other flags (--{', --'.join(other)}): "
                             f"rerun with the same flags, or without --resume")
        if r["world"] != self.world:
            raise ValueError(f"{path} was written by {r['world']} processes: resume with as many")
        return r

    def restore(self, phase, parts):
        """Where `phase` starts: (epoch, batch, step); None when it had finished before the run was
        killed. The checkpoint's states go back into parts (the sampler's also for finished phases)."""
        r = self.resume
        if r is None or PHASES.index(r["phase"]) < PHASES.index(phase):
            return 1, 0, 0
        if parts["sampler"]:
            parts["sampler"].load_state_dict(r["sampler"])
        if r["phase"] != phase:
            return None
        for name, part in parts.items():
            if part is not None:
                part.load_state_dict(r[name])
        self.order.set_state(r["order"]), torch.set_rng_state(r["rng"][self.rank])
        self.resume = None
        print(f"resuming {phase} at epoch {r['epoch']}, batch {r['batch']}")
        return r["epoch"], r["batch"], r["step"]

# ------------------------------------------------------------------------------- the reward
class Reward:
    """The reward of a phase-1/phase-2 step, measured on held-out TRAINING examples (never dev).

    --reward lookahead (default): before the step, EVERY teacher j is scored on the step's batch by
    how much a step of size lr on its soft targets would lower the held-out expected error E, to
    first order. Teacher j's step is -lr * g_j, so with z [B, C] the batch's logits:

        r_j = lr * <h, g_j> = lr * <J h, dL_j/dz>,    h = dE/dtheta,  g_j = J^T dL_j/dz,  J = dz/dtheta

    Teachers differ only in dL_j/dz, so ONE product J h (forward-mode AD: one forward pass that
    carries the direction h) scores the whole team on the same batch and the same held-out
    examples, and the sampler's baseline sum_j p_j r_j cancels what the batch adds to all of them.
    h is measured anew every --probe_every steps, on the next held-out batch.
    --reward step: the drawn teacher alone, the held-out loss before its step minus after it.
    """

    def __init__(self, loop, heldout, soft):
        self.loop, self.heldout, self.soft, self.is_lookahead = loop, heldout, soft, loop.args.reward == "lookahead"
        size = min(len(heldout), loop.args.probe_size or loop.args.batch_size)
        self.probes = [b for b in glue_data.batches(loop.lengths[heldout], size) if len(b) >= loop.world]
        if not self.probes:  # every rank takes a share of a probe
            raise ValueError(f"held-out batches of {size} cannot be shared by {loop.world} processes: "
                             f"raise --probe_size or --heldout")
        self.state = None  # h (lookahead) or the held-out loss (step): what the next reward needs

    def probe(self, step):
        """The held-out examples of this step (a batch kept for --probe_every steps)."""
        return self.heldout[self.probes[(step // self.loop.args.probe_every) % len(self.probes)]].tolist()

    def before(self, student, idx, step, lr):
        if step % self.loop.args.probe_every == 0 or self.state is None:
            self.state = (self.heldout_grad if self.is_lookahead else self.heldout_loss)(student, self.probe(step))
        if self.is_lookahead:
            self.values = self.lookahead(student, idx, self.state, lr).tolist()  # [K]

    def after(self, student, step):
        """The step's reward: every teacher's value (lookahead), or the drawn teacher's (step)."""
        if self.is_lookahead:
            return self.values
        loss = self.heldout_loss(student, self.probe(step))
        reward, self.state = self.state - loss, loss
        return reward

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, d):
        self.state = d["state"]

    @torch.no_grad()
    def heldout_loss(self, student, idx):
        """Hard-label loss on held-out examples, no dropout, averaged over ranks (a host sync)."""
        L, mine = self.loop, idx[self.loop.rank::self.loop.world]
        student.eval()
        loss = L.loss(student, mine, None)
        student.train()
        return float(L.reduce_mean(loss, len(mine)))

    def heldout_grad(self, student, idx):
        """h: the gradient of the expected error on held-out examples (no dropout) over the trainable
        weights, averaged over ranks: a list of tensors shaped as the weights, each with a storage
        of its own (forward-mode AD would copy a slice of a larger tensor at every use)."""
        L, mine = self.loop, idx[self.loop.rank::self.loop.world]
        params = [p for p in student.parameters() if p.requires_grad]
        student.eval()
        logits, i = L.logits(student, mine)
        dE_dz = kd.expected_error_grad(logits.detach(), L.labels[i])  # [B, C]
        grads = torch.autograd.grad(logits, params, dE_dz, materialize_grads=True)  # J^T dE/dz
        student.train()
        if L.world == 1:
            return list(grads)  # (copying them into one flat tensor and back costs a fifth of this)
        h = L.reduce_mean(torch.cat([g.reshape(-1) for g in grads]), len(mine))  # [P]: one all-reduce
        return [v.view_as(p).clone() for v, p in zip(h.split([p.numel() for p in params]), params)]

    def lookahead(self, student, idx, h, lr):
        """Every teacher's r_j on the batch idx, [K] (see the class docstring)."""
        L = self.loop
        b, i = L.batch(idx)
        names, params = zip(*[(n, p) for n, p in student.named_parameters() if p.requires_grad])  # as in h
        weights = tuple(p.detach() for p in params)

        def logits(*w):
            return torch.func.functional_call(student, dict(zip(names, w)), kwargs=b).logits.float()

        student.eval()
        # Forward-mode AD: z and J h in one pass, exact, in float32 (bf16 would drown J h). The fused
        # attention kernels have no forward-mode derivative; the plain one computes the same thing.
        with torch.autocast(L.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
            z, jh = torch.func.jvp(logits, weights, tuple(h))  # [B, C] each
        student.train()
        z = z.detach().requires_grad_()
        dz = []  # dL_j/dz for every teacher j: [K] of [B, C]
        for soft in self.soft:
            loss = kd.kd_loss(z, L.labels[i], soft[i], L.args.temperature, L.args.alpha, L.labelled[i])
            dz.append(torch.autograd.grad(loss, z)[0])
        values = lr * (torch.stack(dz) * jh).sum((1, 2))  # [K]
        return L.reduce_mean(values, 1)  # DDP averages the ranks' gradients alike

# ------------------------------------------------------------------------------- inputs and outputs
def resolve_team(args):
    """Teacher checkpoints, sorted (a draw picks by position, so the order named decides nothing), and
    the student's checkpoint. With no --teachers, the folders in teachers/<TASK>/, where the --team
    recipe is fine-tuned first when none are there (or its build was killed)."""
    if args.strategy == "none":
        if not args.student:
            raise ValueError("--strategy none fine-tunes --student: name a pretrained checkpoint (hub name or folder)")
        return [], args.student
    folder = os.path.join("teachers", args.task)
    recipe = None
    if not args.teachers:
        recipe = build_team(args, folder)
    names = sorted(args.teachers or team_lib.find_teachers(folder))
    if args.strategy == "single" and len(names) != 1:
        raise ValueError(f"--strategy single distils from one teacher; {len(names)} given: name one with --teachers DIR")
    if args.student:
        return names, args.student
    if recipe:
        args.student_layers = args.student_layers or recipe.student_layers
        print(f"student: {recipe.student} (the {args.team or 'small'} team's)")
        return names, recipe.student
    bases = [getattr(AutoConfig.from_pretrained(team_lib.local_folder(n)), "base_model", None) for n in names]
    base = next((b for b in bases if b), None)
    if not base:
        raise ValueError("the teachers do not record the checkpoint they were fine-tuned from: "
                         "pass --student <name or folder>")
    print(f"student: {base} (the base model the teachers were fine-tuned from)")
    return names, base

def build_team(args, folder):
    """The recipe of the team in folder (team.json), its missing teachers fine-tuned first with this
    project's own fine-tuning (--strategy none), each resumed if its run was killed; None when the
    folder holds teachers made otherwise."""
    team_file = os.path.join(folder, "team.json")
    if os.path.isfile(team_file):
        with open(team_file) as f:
            name = json.load(f)["recipe"]
        if args.team and args.team != name:
            raise ValueError(f"{folder}/ holds the {name} team: pass --team {name}, or --teachers DIR [DIR ...]")
    elif team_lib.find_teachers(folder):
        return None  # teachers made by hand
    else:
        name = args.team or "small"
    if name not in team_lib.RECIPES:
        raise ValueError(f"--team {name}: no such recipe (choose {' or '.join(team_lib.RECIPES)})")
    recipe = team_lib.RECIPES[name]
    todo = [t for t in recipe.teachers if not os.path.isfile(os.path.join(folder, t, "metrics.json"))]
    if not todo:
        return recipe
    epochs = recipe.epochs(args.task)
    print(f"building the {name} team in {folder}/ ({len(todo)} of {len(recipe.teachers)} teachers to "
          f"fine-tune, {epochs} epochs each, batch {recipe.batch_size}), then AutoSKD:")
    for t in recipe.teachers:
        checkpoint, lr = recipe.teachers[t]
        print(f"  {t}: {checkpoint}, lr {lr}" + ("" if t in todo else " (there)"))
    for t in todo:  # every checkpoint reachable before hours go into the first
        check_checkpoint(recipe.teachers[t][0], name)
    os.makedirs(folder, exist_ok=True)
    glue_data.write_json(team_file, {"recipe": name})
    for t in todo:
        checkpoint, lr = recipe.teachers[t]
        out = os.path.join(folder, t)
        argv = ["--task", args.task, "--data_dir", args.data_dir, "--strategy", "none", "--student", checkpoint,
                "--epochs", str(epochs), "--lr", str(lr), "--batch_size", str(recipe.batch_size),
                "--max_seq_len", str(args.max_seq_len), "--seed", str(args.seed), "--out_dir", out]
        resume = os.path.isfile(os.path.join(out, "resume.pt"))
        print(f"fine-tuning teacher {t} ({checkpoint})" + (", resumed" if resume else ""))
        main(parse_args(argv + ["--resume"] * resume))
    return recipe

def check_checkpoint(checkpoint, team):
    """Stop with one sentence when a recipe's checkpoint cannot be had (offline, say)."""
    try:
        AutoConfig.from_pretrained(checkpoint)
        AutoTokenizer.from_pretrained(checkpoint)
    except OSError as e:
        raise ValueError(f"could not download {checkpoint} for the {team} team ({str(e).splitlines()[0]}): "
                         f"check the connection, or pass your own team with --teachers DIR [DIR ...] "
                         f"and --student") from None

def fetch_missing_data(args):
    """Write <data_dir>/<TASK> from the hub's GLUE copy when it is missing, as glue_data.py
    --download does (under torchrun rank 0 writes it; the other ranks wait for the folder)."""
    glue_data.get_task(args.task)  # an unknown task: refused before anything is fetched
    folder = os.path.join(args.data_dir, args.task)
    if os.path.isdir(folder):
        return
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"no {args.task} data in {folder}: writing it from the hub's GLUE copy ({glue_data.HUB})")
        glue_data.download([args.task], args.data_dir)
    while not os.path.isdir(folder):
        time.sleep(1)

def load_transfer(args):
    """The transfer set (Examples without labels), or None. `none` has no teacher to label it."""
    if not args.transfer:
        return None
    if args.strategy == "none":
        print(f"note: --strategy none has no teacher to label {args.transfer}; it is not used")
        return None
    return glue_data.read_split(args.transfer, args.task, labelled=False)

def check_skd_weights(args, names):
    """--weights: one non-negative weight per teacher of the sorted team, not all zero; skd only."""
    if args.weights is None:
        return
    if args.strategy != "skd":
        raise ValueError(f"--weights sets --strategy skd's distribution; --strategy is {args.strategy}")
    if len(args.weights) != len(names):
        raise ValueError(f"--weights gives {len(args.weights)} weights for {len(names)} teachers "
                         f"(in this order: {', '.join(names)})")
    if min(args.weights) < 0 or max(args.weights) == 0:
        raise ValueError(f"--weights {' '.join(map(str, args.weights))}: each must be >= 0, "
                         f"and one at least > 0")

def save(loop, student, team, sampler, test):
    """The student with its model card, metrics.json, distribution.json and the test predictions, each
    written whole or not at all."""
    a, out, tmp = loop.args, loop.args.out_dir, os.path.join(loop.args.out_dir, ".student.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp), loop.tokenizer.save_pretrained(tmp)
    except Exception as e:  # a full disk: the student there before, if any, is left whole
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write the student to {out} ({e}); the files there are unchanged") from None
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(out, f))
    os.rmdir(tmp)
    dev, names = loop.history[-1]["dev"], [t.name for t in team]
    final = sampler.probs().tolist() if sampler else [1 / len(team) for _ in team]
    glue_data.write_json(os.path.join(out, "metrics.json"), {
        "task": a.task, "strategy": a.strategy, "seed": a.seed, "dev": dev, "score": glue_data.score(dev),
        "history": loop.history, "timings": loop.timings, "teachers": {t.name: t.dev_metrics for t in team},
        "args": vars(a)})
    if team:
        glue_data.write_json(os.path.join(out, "distribution.json"), {"teachers": names, "final": final} | (
            sampler.record() if a.strategy == "auto" else {}))
        print("final distribution: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, final)))
    glue_data.write_atomic(os.path.join(out, "README.md"), lambda f: f.write(model_card(a, student, dev, names, final)))
    for split, labels in test.items():  # the GLUE server's format: MNLI-m.tsv, RTE.tsv, ...
        path = os.path.join(out, glue_data.test_files(a.task)[split] + ".tsv")
        glue_data.write_atomic(path, lambda f: f.write("index\tprediction\n" + "".join(f"{i}\t{y}\n" for i, y in enumerate(labels))))
        print(f"wrote {path}: {len(labels)} test predictions")
    if os.path.exists(loop.resume_path):
        os.remove(loop.resume_path)  # the run is complete
    print(f"done in {loop.timings['total_s']:.0f}s: dev score {glue_data.score(dev):.4f}; wrote {out}")

def model_card(a, student, dev, teachers, final):
    """README.md for the hub: YAML front matter (task, base model, dev metrics), then how it was distilled."""
    from huggingface_hub import EvalResult, ModelCardData  # comes with transformers
    base, name = student.config.base_model, os.path.basename(os.path.normpath(a.out_dir))
    splits = {ours: hub for hub, ours in glue_data.HUB_SPLITS.items()}  # dev -> validation, ...
    results = [EvalResult(task_type="text-classification", dataset_type=glue_data.HUB, dataset_name=f"GLUE {a.task}",
                          dataset_config=glue_data.HUB_TASKS[a.task][0], dataset_split=splits[s], metric_type=m,
                          metric_value=round(v, 4)) for s, ms in dev.items() for m, v in ms.items()]
    front = ModelCardData(model_name=name, eval_results=results, base_model=None if os.path.isabs(base) else base,
                          datasets=[glue_data.HUB], tags=["knowledge-distillation", "autoskdbert"],
                          library_name="transformers", pipeline_tag="text-classification").to_yaml()
    team = ", ".join(f"{os.path.basename(os.path.normpath(t))} ({p:.3f})" for t, p in zip(teachers, final)) or "none"
    return (f"---\n{front}\n---\n\n# {name}\n\nThe bottom {student.config.num_hidden_layers} transformer layer(s) "
            f"of `{os.path.basename(base)}`, trained on GLUE {a.task} with AutoSKDBERT's reference implementation, "
            f"`distill.py --strategy {a.strategy}` (temperature {a.temperature}, alpha {a.alpha}, epochs {a.epochs}, "
            f"lr {a.lr}, seed {a.seed}).\n\nTeachers, with the final sampling distribution: {team}.\n\n"
            f"Dev: {glue_data.show(dev)}.\n")

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
