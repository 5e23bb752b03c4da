"""The student: building it, the knowledge-distillation loss, saving it with its model card.

Paper: the student is a small BERT that learns, at every step, from ONE teacher's soft targets mixed
with the hard labels (Hinton et al.'s KD loss). Here:

    student   any checkpoint AutoModelForSequenceClassification loads, cut to its BOTTOM layers:
              the best simple strategy in Sajjad et al., "On the effect of dropping layers of
              pre-trained transformer models" (the top layers are the most task-specific;
              fine-tuning re-learns them).
    loss      (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T),
              x_T = softmax(logits / T); T^2 keeps the soft gradients' scale independent of T.
              STS-B (one output): (1 - alpha) * MSE(student, score) + alpha * MSE(student, teacher).
              An unlabelled example of a transfer set (more text than is labelled, as DistilBERT and
              TinyBERT distil on): the soft part alone, T^2 * KL or MSE(student, teacher).
    error     the held-out expected error the reward measures, and its gradient over the logits;
              where_teachers_differ, the examples of a batch on which the team's targets differ.
    features  output_layer, the layer that gives the logits in any head; features_and_logits,
              what it reads on a batch (the reward through the output layer uses both).
    files     save_student writes the student whole or not at all; model_card its hub card.
"""
import os
import shutil
import zipfile

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open  # comes with transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import glue_data

transformers.logging.set_verbosity_error()  # the dropped layers and the new head are expected
transformers.logging.disable_progress_bar()

def build_student(name_or_dir, labels, num_layers=None, task=None):
    """(model, tokenizer): the checkpoint's bottom num_layers layers (all when None) and a new head
    for labels (the task's label names in output order; None: regression, one output). The config
    records the task and the base checkpoint, so a fine-tuned student can serve as a teacher."""
    names = labels or ["score"]
    layers = layers_to_keep(name_or_dir, num_layers)  # the layers above are not even loaded
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_dir, num_hidden_layers=layers, num_labels=len(names),
        id2label=dict(enumerate(names)), label2id={l: i for i, l in enumerate(names)},
        ignore_mismatched_sizes=True)
    model.config.glue_task = task
    is_folder = os.path.isdir(name_or_dir)
    model.config.base_model = os.path.abspath(name_or_dir) if is_folder else name_or_dir
    return model, AutoTokenizer.from_pretrained(name_or_dir)

def layers_to_keep(name_or_dir, num_layers=None):
    """num_layers (all when None), checked against the checkpoint's own number of layers."""
    try:
        have = AutoConfig.from_pretrained(name_or_dir).num_hidden_layers
    except OSError as e:
        raise ValueError(f"--student {name_or_dir} is neither a checkpoint folder nor a model this "
                         f"machine can load from the hub ({str(e).splitlines()[0]})") from None
    if not 1 <= (num_layers or have) <= have:
        raise ValueError(f"--student_layers {num_layers}: {name_or_dir} has {have} layers "
                         f"(choose 1 to {have})")
    if os.path.isdir(name_or_dir):
        check_weight_files(name_or_dir)
    return num_layers or have

def check_weight_files(folder):
    """Stop with one sentence when a checkpoint folder's weights file is damaged (an interrupted
    copy, a full disk): the safetensors header must cover the file, a .bin zip must have its
    directory."""
    for f in sorted(os.listdir(folder)):
        try:
            if f.endswith(".safetensors"):
                safe_open(os.path.join(folder, f), "pt").keys()
            elif f.endswith(".bin"):
                zipfile.ZipFile(os.path.join(folder, f)).close()
        except Exception as e:
            raise ValueError(f"{os.path.join(folder, f)} is damaged ({str(e).splitlines()[0]}): "
                             f"copy or make the checkpoint again") from None

def soft_targets(teacher_logits, T):
    """Teacher outputs [..., C] -> the distribution softmax(logits / T); regression [..., 1]
    unchanged."""
    if teacher_logits.shape[-1] == 1:
        return teacher_logits
    return torch.softmax(teacher_logits / T, -1)

def kd_loss(student_logits, labels, targets=None, T=1.0, alpha=0.5, labelled=None):
    """Distillation loss of a batch: student_logits [B, C] (regression: [B, 1]); labels [B];
    targets: the teacher's soft_targets() [B, C] (regression: its prediction [B, 1]), or None (the
    labels alone). labelled [B] bool, or None for all: an example of the transfer set has no label,
    and its loss is the soft part alone."""
    regression = student_logits.shape[-1] == 1
    if targets is None or alpha == 0:  # (the transfer set comes with a teacher only)
        if regression:
            return F.mse_loss(student_logits[:, 0], labels.float())
        return F.cross_entropy(student_logits, labels)
    if regression:
        hard = (student_logits[:, 0] - labels.float()) ** 2  # [B]
        soft = ((student_logits - targets) ** 2)[:, 0]  # [B]
    else:  # KL(p_teacher || p_student) of each example, times T^2
        hard = F.cross_entropy(student_logits, labels, reduction="none")  # [B]
        log_p = F.log_softmax(student_logits / T, -1)
        soft = F.kl_div(log_p, targets, reduction="none").sum(-1) * T * T  # [B]
    if labelled is None:
        return ((1 - alpha) * hard + alpha * soft).mean()
    per_example = torch.where(labelled, (1 - alpha) * hard + alpha * soft, soft)  # [B]
    return per_example.mean()

def expected_error_grad(logits, labels):
    """dE/dz, [B, C]: the gradient over the logits z [B, C] of what the lookahead reward measures on
    held-out examples, the expected error E = the batch's mean probability of the wrong labels,
    1 - p_y for the right label y (accuracy made smooth); regression [B, 1]: the mean squared error.
    With p = softmax(z), for one example:

        dE/dz_c = p_c * p_y           for every wrong label c
        dE/dz_y = -p_y * (1 - p_y)    with 1 - p_y summed over the wrong labels' p

    Written out, not left to autograd through 1 - p_y: float32 rounds a confident p near 1, and the
    difference would lose its digits (right or wrong, the student is confident late in training).
    Cross-entropy would serve worse as E: an overconfident student lowers it fastest by doubting
    everything, which a teacher that contradicts the labels teaches best."""
    n = logits.shape[0]
    if logits.shape[-1] == 1:
        return 2 * (logits - labels[:, None].float()) / n
    p = torch.softmax(logits, -1)  # [B, C]
    right = F.one_hot(labels, p.shape[-1]).bool()  # [B, C]
    p_right = p.masked_fill(~right, 0).sum(-1, keepdim=True)  # [B, 1]
    p_wrong = p.masked_fill(right, 0).sum(-1, keepdim=True)  # [B, 1]
    return torch.where(right, -p * p_wrong, p * p_right) / n

def where_teachers_differ(soft, m):
    """The m examples of a batch, [m] in batch order, on which the teachers' soft targets differ
    most: the variance over the team, summed over classes (soft [K, B, C]). Only where they differ
    do the rewards differ: r_j - r_k = lr * sum_i <(J h)_i, dL_j/dz_i - dL_k/dz_i>, and on an
    example every teacher labels alike dL_j/dz_i = dL_k/dz_i, whatever (J h)_i."""
    spread = soft.var(0, correction=0).sum(-1)  # [B]
    return spread.topk(min(m, len(spread))).indices.sort().values

# ------------------------------------------------------------------ the output layer's features
def output_layer(student):
    """Return the layer whose output is the logits: the last nn.Linear with one output per label
    (BERT's and DistilBERT's classifier, RoBERTa's and MPNet's classifier.out_proj).
    features_and_logits checks that its output is the logits."""
    n = getattr(student, "module", student).config.num_labels  # (DDP: the model is its .module)
    linears = [m for m in student.modules()
               if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not linears:
        raise ValueError(f"{type(student).__name__} has no linear layer with {n} outputs: use "
                         f"--reward_reach student")
    return linears[-1]

def features_and_logits(student, batch, layer=None):
    """Return (u [B, d], z [B, C]): what the output layer (default: output_layer(student)) reads,
    and the logits of student(**batch)."""
    layer = layer or output_layer(student)
    seen = []
    hook = layer.register_forward_hook(lambda _, inputs, out: seen.append((inputs[0], out)))
    try:
        z = student(**batch).logits
    finally:
        hook.remove()
    u, out = seen[-1]
    if out is not z and (out.shape != z.shape or not torch.equal(out, z)):
        raise ValueError(f"the logits of {type(student).__name__} are not its output layer's "
                         f"output (a head that pools after it): use --reward_reach student")
    return u, z

# ------------------------------------------------------------------------- the student's files
def save_student(student, tokenizer, out):
    """The student's files into out, written beside and moved in: a full disk leaves the student
    there before, if any, whole."""
    tmp = os.path.join(out, ".student.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write the student to {out} ({e}); "
                      f"the files there are unchanged") from None
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(out, f))
    os.rmdir(tmp)

def model_card(a, student, dev, teachers, final, table=()):
    """README.md for the hub: YAML front matter (task, base model, dev metrics), then how it was
    distilled, and the lines of a table of the student beside its teachers."""
    from huggingface_hub import EvalResult, ModelCardData  # comes with transformers
    base = student.config.base_model
    name = os.path.basename(os.path.normpath(a.out_dir))
    splits = {ours: hub for hub, ours in glue_data.HUB_SPLITS.items()}  # dev -> validation, ...
    results = []
    for split, metrics in dev.items():
        for metric, value in metrics.items():
            results.append(EvalResult(
                task_type="text-classification", dataset_type=glue_data.HUB,
                dataset_name=f"GLUE {a.task}", dataset_config=glue_data.HUB_TASKS[a.task][0],
                dataset_split=splits[split], metric_type=metric, metric_value=round(value, 4)))
    front = ModelCardData(
        model_name=name, eval_results=results, base_model=None if os.path.isabs(base) else base,
        datasets=[glue_data.HUB], tags=["knowledge-distillation", "autoskdbert"],
        library_name="transformers", pipeline_tag="text-classification").to_yaml()
    shares = [f"{os.path.basename(os.path.normpath(t))} ({p:.3f})" for t, p in zip(teachers, final)]
    team = ", ".join(shares) or "none"
    layers = student.config.num_hidden_layers
    beside = "".join("\n" + line for line in table) + "\n" if table else ""
    return (f"---\n{front}\n---\n\n# {name}\n\n"
            f"The bottom {layers} transformer layer(s) of `{os.path.basename(base)}`, trained on "
            f"GLUE {a.task} with AutoSKDBERT's reference implementation, `distill.py --strategy "
            f"{a.strategy}` (temperature {a.temperature}, alpha {a.alpha}, epochs {a.epochs}, "
            f"lr {a.lr}, seed {a.seed}).\n\n"
            f"Teachers, with the final sampling distribution: {team}.\n\n"
            f"Dev: {glue_data.show(dev)}.\n" + beside)
