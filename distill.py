"""AutoSKDBERT ("Learn to Stochastically Distill BERT"): the procedure, the loop, the reward.

    python distill.py --task RTE      # phase-1, teacher selection, phase-2, the final student
    python distill.py --task RTE --strategy none --student <name or folder> --out_dir <folder>
    torchrun --nproc_per_node=N distill.py --task RTE   # data-parallel: nccl on GPUs, gloo on CPUs

The second command fine-tunes one teacher. Read from main(): the data, the team, each strategy's
teaching (setup), then autoskd(): phase-1, teacher selection, phase-2, the final student. A step
(Loop.train): k ~ Categorical(p), the KD loss on teacher k's soft targets, an optimizer step, the
reward on held-out TRAINING examples (heldout_output_grad, output_layer_rewards: plain functions of
a model and tensors; dev is for reporting only), and sampler.update(k, reward), which moves theta_k
alone.
"""
import argparse
import functools
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoTokenizer

import glue_data
import model as kd
import teachers as team_lib
from sampler import TeacherSampler, check_keep, check_weights, teacher_rank

STRATEGIES = ("auto", "uniform", "skd", "single", "ensemble", "none")
PHASES = ("phase1", "phase2", "final")

def parse_args(argv=None):
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
    """How the students train: budget, KD loss, sampler and reward; seed, outputs, resume."""
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
    """The command: the data, the team (a --team recipe fine-tuned first when there is none), then
    distil()."""
    start = time.time()
    if finished_already(args):
        return
    data, transfer, test = read_data(args)
    names, base = choose_team(args, data)
    distil(args, data, names, base, transfer, test, start)

def read_data(args):
    """(train and dev {split: Examples}, the transfer set or None, the test splits with
    --predict_test): every file read before anything long starts, so a bad row stops us at once."""
    glue_data.fetch_missing(args.task, args.data_dir)
    data = glue_data.load_task(args.data_dir, args.task)
    transfer = None
    if args.transfer and args.strategy == "none":
        print(f"note: --strategy none has no teacher to label {args.transfer}; it is not used")
    elif args.transfer:
        transfer = glue_data.read_split(args.transfer, args.task, labelled=False)
    test = glue_data.load_task(args.data_dir, args.task, test=True) if args.predict_test else {}
    return data, transfer, test

def distil(args, data, names, base, transfer, test, start, label=None):
    """Distil base's bottom layers from the teachers names with args.strategy (no teachers:
    fine-tune), predict the test splits {split: Examples}, save all; start: time.time() at start;
    label: what progress calls the training (default: student, or fine-tune)."""
    check_weights(args.weights, names, args.strategy)
    kd.layers_to_keep(base, args.student_layers)  # fail now, not after the teachers have run
    keep = args.keep if args.keep is not None else math.ceil(len(names) / 2)
    if args.strategy == "auto":
        check_keep(keep, len(names))
    tokenizer = AutoTokenizer.from_pretrained(base)
    loop = Loop(args, data, tokenizer, transfer, label)
    team = []
    if names:
        teacher_data = data | ({"transfer": transfer} if transfer else {})
        team = team_lib.load_team(names, args.task, teacher_data, args.max_seq_len,
                                  args.cache_dir, loop.device)
    loop.timings["teachers_s"] = time.time() - start
    soft, sampler = setup(args, team, loop.device)
    student = autoskd(loop, base, soft, sampler, keep)
    student.eval()
    predictions = {}  # (every rank takes part)
    for split, examples in test.items():
        logits = team_lib.predict(student, tokenizer, examples, args.max_seq_len, loop.device)
        predictions[split] = glue_data.label_texts(args.task, logits)
    dev = data[glue_data.get_task(args.task).dev[0]]
    t = loop.clock()
    figures = team_lib.beside_the_team(team, student, tokenizer, dev, args.max_seq_len, loop.device)
    loop.timings["table_s"] = loop.clock() - t  # (bench.py --speed counts it apart)
    loop.timings["total_s"] = time.time() - start
    if loop.rank == 0:  # rank 0 writes
        save(loop, student, team, sampler, predictions, figures)
    if loop.world > 1:
        dist.barrier()  # the ranks end together: one torn down while another still runs can abort

def finished_already(args):
    """--resume of a run that had finished: nothing to do, and its results are left alone."""
    metrics = os.path.join(args.out_dir, "metrics.json")
    resumable = os.path.isfile(os.path.join(args.out_dir, "resume.pt"))
    finished = args.resume and os.path.isfile(metrics) and not resumable
    if finished:
        print(f"{args.out_dir} holds a finished run ({metrics}): nothing to resume; left as is")
    return finished

def setup(args, team, device):
    """Each strategy's teaching, in one place: (soft targets [K, N, C] or None, sampler or None).
    A step distils from soft[k], k drawn from the sampler (k = 0 without one)."""
    if not team:
        return None, None  # none: the labels alone
    soft = torch.stack([kd.soft_targets(t.train, args.temperature) for t in team]).to(device)
    if args.strategy == "ensemble":
        return soft.mean(0, keepdim=True), None  # the team's mean soft targets, at every step
    if args.strategy == "single":
        return soft, None
    names = [t.name for t in team]
    sampler = TeacherSampler(names, lr=args.sampler_lr, seed=args.seed, warmup=args.sampler_warmup)
    if args.strategy == "skd":  # SKDBERT: a fixed p, p_k = w_k / sum_j w_j
        weights = args.weights or teacher_rank([glue_data.score(t.dev_metrics) for t in team])
        sampler.theta = torch.tensor(weights, dtype=torch.float64).log()
        shown = [f"{name} {p:.3f}" for name, p in zip(names, sampler.probs())]
        print("skd distribution: " + ", ".join(shown))
    return soft, sampler  # auto: p is learned; uniform and skd: p stays as it is

def autoskd(loop, base, soft, sampler, keep):
    """AutoSKD. With --strategy auto, p is learned first, on a student used for nothing else:
    phase-1 over the whole team, teacher selection, phase-2 over the kept teachers, with rewards on
    held-out labelled examples. Then the final student, the one reported (every strategy): fresh, on
    all of train (and the transfer set), drawing its teachers from the frozen p."""
    a = loop.args
    n = loop.n_labelled  # train's examples; those of the transfer set follow them
    everything = torch.arange(len(loop.labels))  # [N + M]
    if a.strategy == "auto":
        shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed))
        n_held = max(1, int(a.heldout * n))
        heldout = shuffled[:n_held]  # the reward's examples, never trained on in phases 1-2
        train_idx = torch.cat([shuffled[n_held:], everything[n:]])  # the rest, then transfer
        reward = Reward(loop, heldout, soft)
        print(f"AutoSKD: phase-1 {loop.steps(a.phase1_epochs, len(train_idx))} steps, teacher "
              f"selection, phase-2 {loop.steps(a.phase2_epochs, len(train_idx))} steps; then:")
        epochs = a.phase1_epochs + a.phase2_epochs
        student, opt, sched = loop.new_student(base, epochs, len(train_idx))
        loop.train("phase1", student, opt, sched, a.phase1_epochs, train_idx, soft, sampler, reward)
        sampler.select_teachers(keep)  # teacher selection, by the phase-1 evidence
        sampler.show_selection()
        loop.train("phase2", student, opt, sched, a.phase2_epochs, train_idx, soft, sampler, reward)
    # The final student: p frozen, no reward.
    steps = loop.steps(a.epochs, len(everything))
    print(f"{loop.shown['final']}: {a.epochs} epoch(s), {steps} steps")
    student, opt, sched = loop.new_student(base, a.epochs, len(everything))
    loop.train("final", student, opt, sched, a.epochs, everything, soft, sampler)
    return student

# ------------------------------------------------------------------------------- the training loop
def warmup_then_decay(step, warmup, total):
    """The lr's factor: linear warm-up (non-zero from step 0), then linear decay to 0 at total."""
    return min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))

def init_distributed():
    """(device, rank, world): one process per device under torchrun (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank() if world > 1 else 0, world

class Loop:
    """What every phase shares: the task's data, encoded once for the student, the device, ranks."""

    def __init__(self, args, data, tokenizer, transfer=None, label=None):
        self.args = args
        final = label or ("fine-tune" if args.strategy == "none" else "student")
        self.shown = {"phase1": "phase-1", "phase2": "phase-2", "final": final}  # progress's names
        self.data = data
        self.tokenizer = tokenizer
        self.device, self.rank, self.world = init_distributed()
        # CPU time on CPU: a virtual machine's host may steal wall time
        self.clock = time.process_time if self.device.type == "cpu" else time.perf_counter
        # The training examples: train's N labelled ones, then the M of the transfer set if any.
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
        glue_data.check_writable(args.out_dir, self.rank)
        self.resume_path = os.path.join(args.out_dir, "resume.pt")
        self.resume = self.load_checkpoint() if args.resume else None
        self.history = self.resume["history"] if self.resume else []  # dev metrics, every epoch

    def new_student(self, base, epochs, n_train):
        """A fresh student, its AdamW and its schedule; a step calls self.net (torchrun: DDP)."""
        a = self.args
        torch.manual_seed(a.seed)  # the new head and dropout repeat with the seed
        labels = glue_data.get_task(a.task).labels
        student = kd.build_student(base, labels, a.student_layers, a.task)[0].to(self.device)
        if self.rank:
            torch.manual_seed(a.seed + 1000 * self.rank)  # each rank its own dropout masks
        self.net = DDP(student, forward_sync_buffers=False) if self.world > 1 else student
        steps = self.steps(epochs, n_train)
        warmup = max(1, steps // 10)
        opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_then_decay(step, warmup, steps))
        return student, opt, sched

    def steps(self, epochs, n):
        return epochs * math.ceil(n / self.args.batch_size)

    def batch(self, idx):
        """Examples idx on the device: ({token tensor name: [B, L]}, idx [B]); on GPU through pinned
        memory, with no host sync."""
        b = glue_data.collate(self.tokenizer, self.enc, idx) | {"idx": torch.tensor(idx)}
        if self.device.type == "cuda":
            b = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in b.items()}
        return b, b.pop("idx")

    def loss(self, student, idx, soft_k, layer=None):
        """(KD loss of the examples idx, seen); soft_k [N, C]: one teacher's soft targets, or None
        (the labels alone); seen: (u, z) at layer (features_and_logits), None without a layer."""
        a = self.args
        b, i = self.batch(idx)
        seen = None
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            if layer is None:
                logits = student(**b).logits
            else:
                seen = features_and_logits(student, b, layer)
                logits = seen[1]
        logits = logits.float()  # [B, C], bf16 autocast on GPU
        targets = soft_k[i] if soft_k is not None else None
        loss = kd.kd_loss(logits, self.labels[i], targets, a.temperature, a.alpha, self.labelled[i])
        return loss, seen

    def reduce_mean(self, value, n):
        """Mean over ranks of a per-rank mean of n examples: a tensor of any shape, or a list of
        them (one all-reduce for all)."""
        if self.world == 1:
            return value
        parts = value if isinstance(value, list) else [value]
        count = torch.tensor([float(n)], device=parts[0].device)
        t = torch.cat([v.detach().float().reshape(-1) * n for v in parts] + [count])  # [numel + 1]
        dist.all_reduce(t)
        means = (t[:-1] / t[-1]).split([v.numel() for v in parts])
        out = [m.view_as(v).clone() for m, v in zip(means, parts)]  # each with its own storage
        return out if isinstance(value, list) else out[0]

    def train(self, phase, student, opt, sched, epochs, train_idx, soft, sampler=None, reward=None):
        """Train student for `epochs` over train_idx. Every step: teacher k ~ Categorical(p) (k = 0
        without a sampler), the KD loss on soft[k] (soft [K, N, C]; None: the labels alone), an
        AdamW step; with a reward (phases 1-2), the sampler learns from it."""
        parts = dict(student=student, opt=opt, sched=sched, sampler=sampler, reward=reward)
        start = self.restore(phase, parts)
        if start is None:
            return  # the phase had finished before the run was killed
        first, skip, step = start
        self.ema = None  # the loss shown and checked for NaN: a moving average over the phase
        student.train()  # dropout on: from_pretrained hands over a model in eval mode
        for epoch in range(first, epochs + 1):
            t = self.clock()
            order_state = self.order.get_state()  # to draw the epoch's batches again on resume
            order = glue_data.batches(self.lengths[train_idx], self.args.batch_size, self.order)
            desc = f"{self.shown[phase]} epoch {epoch}/{epochs}"
            bar = tqdm(order[skip:], desc, len(order), initial=skip, mininterval=1)
            for i, b in enumerate(bar, skip):
                if len(b) < self.world:
                    continue  # a last batch too small to give every rank an example
                idx = train_idx[b].tolist()[self.rank::self.world]  # this rank's share of the batch
                k = sampler.sample() if sampler else 0
                if reward:
                    reward.before(student, idx, step, opt.param_groups[0]["lr"], sampler.active)
                soft_k = soft[k] if soft is not None else None
                loss, seen = self.loss(self.net, idx, soft_k, reward.layer if reward else None)
                save = (step + 1) % self.args.save_every == 0
                where = f"{self.shown[phase]} epoch {epoch} step {step + 1}"
                self.step(loss, parts, bar, where, read=save or i == len(order) - 1)
                if reward:
                    sampler.update(k, reward.after(student, step, seen))  # only theta_k moves
                step += 1
                if save:
                    self.checkpoint(parts, phase=phase, epoch=epoch, batch=i + 1, step=step,
                                    order=order_state)
            skip = 0
            self.count_time(phase, step, self.clock() - t)
            self.evaluate(phase, epoch, student)
            self.checkpoint(parts, phase=phase, epoch=epoch + 1, batch=0, step=step,
                            order=self.order.get_state())

    def count_time(self, phase, steps, seconds):
        """The training steps' own time (no evaluation), for bench.py --speed."""
        self.timings[phase + "_steps"] = steps
        self.timings[phase + "_steps_s"] = self.timings.get(phase + "_steps_s", 0) + seconds

    def step(self, loss, parts, bar, where, read):
        """Backward, clip, AdamW and schedule steps. A NaN loss stops the run before the weights get
        it: read on the host every step on CPU; on GPU every 50 steps and when `read`."""
        ema = loss.detach() if self.ema is None else 0.98 * self.ema + 0.02 * loss.detach()
        self.ema = ema  # (a NaN stays in it)
        if self.device.type == "cpu" or bar.n % 50 == 0 or read:
            value = float(self.reduce_mean(ema, 1))
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{where}: the loss is {value}; the usual cause is a learning rate too high "
                    f"for this model (--lr {self.args.lr}), or bf16 overflow on GPU")
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts["student"].parameters(), 1.0)
        parts["opt"].step()
        parts["sched"].step()
        parts["opt"].zero_grad(set_to_none=True)

    def evaluate(self, phase, epoch, student):
        """Dev metrics, for reporting only: {split: {metric: value}}."""
        a = self.args
        student.eval()
        dev = {}
        for split in glue_data.get_task(a.task).dev:
            examples = self.data[split]
            logits = team_lib.predict(student, self.tokenizer, examples, a.max_seq_len, self.device)
            dev[split] = glue_data.compute_metrics(a.task, logits, examples.labels)
        student.train()
        self.history.append({"phase": phase, "epoch": epoch, "dev": dev})
        print(f"{self.shown[phase]} epoch {epoch}: {glue_data.show(dev)}")

    # ------------------------------------------------------------------ resume: all of it
    def checkpoint(self, parts, **where):
        """All --resume needs to go on from the next batch as if never killed (rank 0 writes)."""
        rng = [torch.get_rng_state()] * self.world  # each rank's own (its dropout masks differ)
        if self.world > 1:
            dist.all_gather_object(rng, torch.get_rng_state())
        if self.rank > 0:
            return
        states = {name: part.state_dict() for name, part in parts.items() if part is not None}
        run = {"rng": rng, "world": self.world, "history": self.history, "args": vars(self.args)}
        state = where | states | run
        glue_data.write_atomic(self.resume_path, lambda f: torch.save(state, f), binary=True)

    def load_checkpoint(self):
        """The checkpoint --resume goes on from (None: none), refused if of other flags."""
        path = self.resume_path
        if not os.path.isfile(path):
            print(f"note: nothing to resume in {self.args.out_dir}; starting afresh")
            return None
        try:
            r = torch.load(path, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is damaged ({str(e).splitlines()[0]}): rerun without "
                             f"--resume to start afresh, or delete it") from None
        other = differing_flags(r["args"], vars(self.args))
        if other:
            raise ValueError(f"{path} was written with other flags (--{', --'.join(other)}): "
                             f"rerun with the same flags, or without --resume")
        if r["world"] != self.world:
            raise ValueError(f"{path} was written by {r['world']} processes: resume with as many")
        return r

    def restore(self, phase, parts):
        """(epoch, batch, step) where `phase` starts; None if it finished before the run was killed.
        The checkpoint's states go back into parts (the sampler's also for finished phases)."""
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
        self.order.set_state(r["order"])
        torch.set_rng_state(r["rng"][self.rank])
        self.resume = None
        print(f"resuming {phase} at epoch {r['epoch']}, batch {r['batch']}")
        return r["epoch"], r["batch"], r["step"]

FREE_FLAGS = ("resume", "save_every")  # flags that change nothing of what a run computes

def differing_flags(these, those, free=FREE_FLAGS):
    """The flags ({flag: value}, as vars(args)) whose values `these` and `those` do not share; a
    flag one of them lacks (a newer flag) differs."""
    flags = list(these) + [k for k in those if k not in these]
    return [k for k in flags if k not in free and these.get(k) != those.get(k)]

# ------------------------------------------------------------------------------- the reward
# The reward as plain functions of a model and tensors: copy them into any training loop.
# --reward lookahead (default): EVERY teacher j is scored on the step's batch by how much a step of
# size lr on its soft targets would lower the held-out expected error E, to first order. Teacher
# j's step is -lr * g_j, so with z [B, C] the batch's logits:
#
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
#
#     (J h)_i = h_W u_i + h_b,   h_W = sum_m dE/dz'_m u'_m^T,   h_b = sum_m dE/dz'_m
#
# u and z come from the training step's own forward (dropout on, so u carries its mask; h is
# measured with dropout off): the reward costs no pass of its own.
# --reward_reach student: J h over every trainable weight, by one forward-mode pass (about a
# fine-tuning step's work). --reward step: the drawn teacher alone, the held-out loss before its
# step minus after it.
def output_layer(model):
    """The layer whose output is the logits: the last nn.Linear with one output per label (BERT's
    and DistilBERT's classifier, RoBERTa's and MPNet's classifier.out_proj).
    features_and_logits checks that its output is the logits."""
    n = getattr(model, "module", model).config.num_labels  # (DDP: the model is its .module)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer with {n} outputs: use "
                         f"--reward_reach student")
    return linears[-1]

def features_and_logits(model, batch, layer=None):
    """(u [B, d], z [B, C]): what the output layer (default: output_layer(model)) reads, and the
    logits of model(**batch)."""
    layer = layer or output_layer(model)
    seen = []
    hook = layer.register_forward_hook(lambda _, inputs, out: seen.append((inputs[0], out)))
    try:
        z = model(**batch).logits
    finally:
        hook.remove()
    u, out = seen[-1]
    if out is not z and (out.shape != z.shape or not torch.equal(out, z)):
        raise ValueError(f"the logits of {type(model).__name__} are not its output layer's output "
                         f"(a head that pools after it): use --reward_reach student")
    return u, z

def at_least_float32(x):
    """x in float32 when it is in a narrower float (bf16 autocast), else as it is (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

def teacher_pulls(z, labels, soft, temperature, alpha, labelled=None):
    """dL_j/dz, [K, B, C]: the KD loss's gradient over the logits z [B, C] for every teacher's soft
    targets soft [K, B, C]; labels [B]; labelled [B] bool (None: all labelled)."""
    z = at_least_float32(z.detach()).requires_grad_()
    pulls = []
    with torch.enable_grad():
        for soft_j in soft:
            loss = kd.kd_loss(z, labels, soft_j, temperature, alpha, labelled)
            pulls.append(torch.autograd.grad(loss, z)[0])
    return torch.stack(pulls)

@torch.no_grad()
def heldout_output_grad(model, batch, labels):
    """h through the output layer alone, [h_W [C, d], h_b [C]]: the gradient of the expected error
    E on held-out examples over the layer's weight and bias, from one forward without gradients,
    dropout off. batch: {input name: [H, L]}; labels [H] (both moved to the layer's device)."""
    layer = output_layer(model)
    device = layer.weight.device
    batch = {name: x.to(device) for name, x in batch.items()}
    was_training = model.training
    model.eval()
    try:
        u, z = features_and_logits(model, batch, layer)  # [H, d], [H, C]
    finally:
        model.train(was_training)
    with torch.autocast(device.type, enabled=False):  # float32 (or 64) under bf16 autocast too
        dE_dz = kd.expected_error_grad(at_least_float32(z), labels.to(device))  # [H, C]
        h_W = dE_dz.T @ u.to(dE_dz.dtype)  # [C, d]
    h_b = dE_dz.sum(0) if layer.bias is not None else torch.zeros_like(dE_dz[0])  # [C]
    return [h_W, h_b]

def output_layer_rewards(u, z, labels, soft, h, lr, temperature, alpha, labelled=None):
    """Every teacher's r_j = lr * <J h, dL_j/dz> through the output layer, [K]: u [B, d] and z
    [B, C] from features_and_logits; h from heldout_output_grad; the rest as lookahead_rewards."""
    h_W, h_b = h
    with torch.autocast(z.device.type, enabled=False):  # float32 (or 64) under bf16 autocast too
        u = u.detach().to(torch.promote_types(u.dtype, h_W.dtype))
        jh = u @ h_W.T + h_b  # [B, C]
        pulls = teacher_pulls(z, labels, soft, temperature, alpha, labelled)  # [K, B, C]
    return lr * (pulls * jh).sum((1, 2))

def heldout_grad(model, batch, labels):
    """h: the gradient of the expected error E on held-out examples (model.expected_error_grad),
    dropout off, over the trainable weights: a list of tensors in model.parameters() order, each
    with a storage of its own (forward-mode AD would copy a slice of a larger tensor at each use).
    batch: {input name: [H, L]}; labels [H]."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    logits = at_least_float32(model(**batch).logits)  # [H, C]
    dE_dz = kd.expected_error_grad(logits.detach(), labels)  # [H, C]
    h = torch.autograd.grad(logits, params, dE_dz, materialize_grads=True)  # J^T dE/dz
    model.train(was_training)
    return list(h)

def lookahead_rewards(model, batch, labels, soft, h, lr, temperature, alpha, labelled=None):
    """Every teacher's r_j = lr * <J h, dL_j/dz> on the batch through every trainable weight, [K].
    batch: {input name: [B, L]}; labels [B]; soft [K, B, C]: every teacher's soft targets
    (model.soft_targets); h from heldout_grad; labelled [B] bool, False for transfer examples
    (None: all labelled)."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # as in h
    names = [n for n, _ in trained]
    weights = tuple(p.detach() for _, p in trained)

    def logits(*w):
        z = torch.func.functional_call(model, dict(zip(names, w)), kwargs=batch).logits
        return at_least_float32(z)

    was_training = model.training
    model.eval()
    # Forward-mode AD: z and J h in one pass, exact, in float32 (bf16 would drown J h). The fused
    # attention kernels have no forward-mode derivative; the plain one computes the same.
    with torch.autocast(weights[0].device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        z, jh = torch.func.jvp(logits, weights, tuple(h))  # [B, C] each
    model.train(was_training)
    return lr * (teacher_pulls(z, labels, soft, temperature, alpha, labelled) * jh).sum((1, 2))

@torch.no_grad()
def heldout_loss(model, batch, labels):
    """The hard-label loss on held-out examples, dropout off (--reward step: before - after)."""
    was_training = model.training
    model.eval()
    logits = model(**batch).logits.float()  # [H, C]
    model.train(was_training)
    return kd.kd_loss(logits, labels)

class Reward:
    """The loop's reward of a phase-1/2 step on held-out TRAINING examples (never dev): each step's
    held-out batch (a new one every --probe_every steps), the mean over ranks; the values above."""

    def __init__(self, loop, heldout, soft):
        self.loop = loop
        self.heldout = heldout  # [H] indices of held-out training examples
        self.soft = soft  # [K, N, C]
        self.is_lookahead = loop.args.reward == "lookahead"
        self.reach = loop.args.reward_reach if self.is_lookahead else None
        size = min(len(heldout), loop.args.probe_size or loop.args.batch_size)
        probes = glue_data.batches(loop.lengths[heldout], size)
        self.probes = [b for b in probes if len(b) >= loop.world]  # every rank takes a share
        if not self.probes:
            raise ValueError(f"held-out batches of {size} cannot be shared by {loop.world} "
                             f"processes: raise --probe_size or --heldout")
        self.state = None  # h (lookahead) or the held-out loss (step): what the next reward needs
        self.layer = None  # reach output: the layer whose features the step's forward hands over
        self.scored = None  # lookahead: (the batch, its rows scored, their share, the step's lr)
        self.values = None  # reach student: the step's r_j, [K] floats

    def probe(self, step):
        """The held-out examples of this step (a batch kept for --probe_every steps)."""
        n = step // self.loop.args.probe_every
        return self.heldout[self.probes[n % len(self.probes)]].tolist()

    def before(self, student, idx, step, lr, active=None):
        """Before the step on the batch idx: h or the held-out loss, measured anew every
        --probe_every steps. lookahead: the rows scored, the --lookahead_share of the batch where
        the teachers in play (active: K bools) differ most; reach student: their r_j, now."""
        L = self.loop
        a = L.args
        if step % a.probe_every == 0 or self.state is None:
            self.state = self.measure(student, self.probe(step)[L.rank::L.world])
        if not self.is_lookahead:
            return
        rows = list(range(len(idx)))
        m = math.ceil(a.lookahead_share * len(idx))
        if m < len(idx):
            in_play = self.soft[:, idx][torch.tensor(active or [True] * len(self.soft))]
            rows = kd.where_teachers_differ(in_play, m).tolist()
        share = len(rows) / len(idx)  # as a mean over the batch: the rest adds next to nothing
        self.scored = (idx, rows, share, lr)
        if self.reach == "output":  # after(): from the step's own features at the output layer
            if self.layer is None:
                self.layer = output_layer(student)
            return
        batch, i = L.batch([idx[j] for j in rows])
        values = lookahead_rewards(student, batch, L.labels[i], self.soft[:, i], self.state, lr,
                                   a.temperature, a.alpha, L.labelled[i])
        self.values = L.reduce_mean(values * share, 1).tolist()  # [K], as DDP averages gradients

    def measure(self, student, mine):
        """h (lookahead) or the held-out loss (step): this rank's examples mine, mean over ranks."""
        L = self.loop
        batch, i = L.batch(mine)
        with torch.autocast(L.device.type, torch.bfloat16, enabled=L.device.type == "cuda"):
            if not self.is_lookahead:
                return float(L.reduce_mean(heldout_loss(student, batch, L.labels[i]), len(mine)))
            measure = heldout_output_grad if self.reach == "output" else heldout_grad
            return L.reduce_mean(measure(student, batch, L.labels[i]), len(mine))

    def after(self, student, step, seen=None):
        """The step's reward: every teacher's value (lookahead), or the drawn teacher's (step).
        seen: (u [B, d], z [B, C]) of the step's own forward (reach output)."""
        L = self.loop
        if self.reach == "output":
            idx, rows, share, lr = self.scored
            i = torch.tensor([idx[j] for j in rows], device=L.device)
            u, z = (x.detach()[torch.tensor(rows, device=x.device)] for x in seen)  # float32 below
            values = output_layer_rewards(u, z, L.labels[i], self.soft[:, i], self.state, lr,
                                          L.args.temperature, L.args.alpha, L.labelled[i])
            return L.reduce_mean(values * share, 1).tolist()  # [K]
        if self.is_lookahead:
            return self.values
        loss = self.measure(student, self.probe(step)[L.rank::L.world])
        reward = self.state - loss
        self.state = loss
        return reward

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, d):
        self.state = d["state"]

# ------------------------------------------------------------------------------- inputs and outputs
def choose_team(args, data):
    """(teacher checkpoints, the student's checkpoint: --student, the recipe's, or the one the
    teachers record). With no --teachers, a --team recipe may be fine-tuned first (fine_tune)."""
    if args.strategy == "none":
        if not args.student:
            raise ValueError("--strategy none fine-tunes --student: name a pretrained checkpoint "
                             "(hub name or folder)")
        return [], args.student
    fine_tune_one = functools.partial(fine_tune, args, data)
    n = len(data["train"])
    names, recipe = team_lib.choose_team(args.teachers, args.task, args.team, fine_tune_one, n)
    if args.strategy == "single" and len(names) != 1:
        raise ValueError(f"--strategy single distils from one teacher; {len(names)} given: "
                         f"name one with --teachers DIR")
    if args.student:
        return names, args.student
    if recipe:
        args.student_layers = args.student_layers or recipe.student_layers
        print(f"student: {recipe.student} (the {args.team or 'small'} team's)")
        return names, recipe.student
    base = team_lib.recorded_base(names)
    print(f"student: {base} (the base model the teachers were fine-tuned from)")
    return names, base

def fine_tune(args, data, teacher, checkpoint, lr, epochs, batch_size, out):
    """One teacher of a recipe: plain fine-tuning (--strategy none) of checkpoint into out, on the
    data of the run args, resumed if killed."""
    argv = ["--task", args.task, "--data_dir", args.data_dir, "--strategy", "none",
            "--student", checkpoint, "--epochs", str(epochs), "--lr", str(lr),
            "--batch_size", str(batch_size), "--max_seq_len", str(args.max_seq_len),
            "--seed", str(args.seed), "--out_dir", out]
    resume = os.path.isfile(os.path.join(out, "resume.pt"))
    print(f"fine-tuning teacher {teacher} ({checkpoint})" + (", resumed" if resume else ""))
    teacher_args = parse_args(argv + ["--resume"] * resume)
    distil(teacher_args, data, [], checkpoint, None, {}, time.time(), f"fine-tune {teacher}")

def save(loop, student, team, sampler, test, figures):
    """The student with its model card, metrics.json, distribution.json and the test predictions,
    each written whole or not at all; with a team, the table of the student beside it."""
    a = loop.args
    out = a.out_dir
    kd.save_student(student, loop.tokenizer, out)
    dev = loop.history[-1]["dev"]
    names = [t.name for t in team]
    final = sampler.probs().tolist() if sampler else [1 / len(team) for _ in team]
    metrics = {"task": a.task, "strategy": a.strategy, "seed": a.seed, "dev": dev,
               "score": glue_data.score(dev), "history": loop.history, "timings": loop.timings,
               "teachers": {t.name: t.dev_metrics for t in team}, "args": vars(a)}
    kept = sampler.active if a.strategy == "auto" else None  # selection's verdicts
    table = team_lib.closing_table(team, figures, metrics["score"], kept, final) if team else {}
    metrics["beside_the_team"] = table
    glue_data.write_json(os.path.join(out, "metrics.json"), metrics)
    if team:
        learned = sampler.record() if a.strategy == "auto" else {}
        distribution = {"teachers": names, "final": final} | learned
        glue_data.write_json(os.path.join(out, "distribution.json"), distribution)
        shown = [f"{name} {p:.3f}" for name, p in zip(names, final)]
        print("final distribution: " + ", ".join(shown))
    card = kd.model_card(a, student, dev, names, final, table.get("lines", []))
    glue_data.write_atomic(os.path.join(out, "README.md"), lambda f: f.write(card))
    for split, labels in test.items():
        glue_data.write_predictions(a.task, split, labels, out)
    if os.path.exists(loop.resume_path):
        os.remove(loop.resume_path)  # the run is complete
    done = f"done in {loop.timings['total_s']:.0f}s: dev score {metrics['score']:.4f}; wrote {out}"
    print("\n".join([done] + table.get("lines", [])))  # then the student beside its teachers

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
