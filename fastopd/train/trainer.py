"""On-policy distillation of a Hugging Face causal LM, with the release rule. The whole loop is in this file.

One optimizer step (:func:`train_step`, steps 1-6 in :func:`micro_step`, step 7 in :func:`finish_step`),
repeated ``cfg.steps`` times by ``train`` (at the bottom; :func:`setup` builds everything a step needs):

1. take ``prompts_per_step`` prompts (:class:`fastopd.train.data.PromptSchedule`);
2. the student samples ``num_samples`` completions of each with HF ``generate`` (``generate_completions``);
3. every completion is cut into sentence segments (``fastopd.segment.batch_token_segments``; -1 at padding);
4. the teacher scores prompt + completion under ``no_grad``; the student runs forward with gradients
   (``completion_loss``: by default both models' final hidden states at the positions that predict the
   completion tokens plus their LM heads, ``fastopd.train.hidden``, so that no (N, C, V) logits exist;
   ``loss_from="logits"``: ``completion_logits``, logits at position t-1 predict token t);
5. ``fastopd.OPDLoss(rule=fastopd.ReleaseRule(mode=cfg.mode))`` decides the per-token weights (the release
   rule, or the ``full`` / ``fixed_prefix`` / ``random`` / ``shuffled`` control) and returns the loss
   (docs/formulas.md §1-5);
6. backward; after ``grad_accum_steps`` micro-batches: clip, AdamW step, LR schedule step;
7. log (JSONL, tqdm, TensorBoard), evaluate (greedy decoding + a verifier), checkpoint.

The same code runs on one CPU, one GPU, or several processes under ``accelerate launch`` (DDP or FSDP): the
student goes through ``accelerator.prepare``; generation runs on ``accelerator.unwrap_model(student)``;
metrics are summed over processes with ``accelerator.reduce``. No formula lives here: the weights and the
loss come from :class:`fastopd.ReleaseRule` and :class:`fastopd.OPDLoss` only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastopd.loss import OPDLoss
from fastopd.common import RELEASE_SUM_KEYS, release_means, release_sums
from fastopd.release import ReleaseRule
from fastopd.train.checkpoint import (
    latest_checkpoint, list_checkpoints, load_training_state, save_checkpoint,
)
from fastopd.train.config import TrainConfig
from fastopd.train.data import PromptSchedule, load_prompts
from fastopd.train.hidden import hidden_loss
from fastopd.train.runlog import RunLog, read_log

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------
# Set-up: accelerator, models, vocabulary check
# ----------------------------------------------------------------------------------------------------------


def make_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` for the config: mixed precision, gradient accumulation, trackers."""
    from accelerate import Accelerator

    mixed = cfg.mixed_precision
    if mixed == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mixed = None  # what `accelerate launch --mixed_precision ...` asked for
        elif torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            mixed = "bf16"
        else:
            mixed = "no"
    log_with = None
    if cfg.log_with == "tensorboard" or (cfg.log_with == "auto" and tensorboard_available()):
        log_with = "tensorboard"
    return Accelerator(
        mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=log_with, project_dir=cfg.output_dir,
    )


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def attention_implementation(requested: str, device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash-attn is installed, sdpa otherwise (or what was asked for)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _dtype(name: str, role: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if (role == "teacher" and device.type == "cuda") else torch.float32
    return getattr(torch, name)


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (EOS when it has none) and left truncation for long prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name} has no EOS token; generation could not stop")
    tok.truncation_side = "left"
    return tok


def load_teacher_tokenizer(cfg: TrainConfig, student_tokenizer):
    """The teacher's own tokenizer for the vocabulary check: ``teacher_tokenizer``, else the teacher's folder
    or hub repo; the shared ``tokenizer`` only when the teacher ships none (nothing to compare then)."""
    if cfg.teacher_tokenizer:
        return load_tokenizer(cfg.teacher_tokenizer, trust_remote_code=cfg.trust_remote_code)
    try:
        return load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError):
        print(f"note: no tokenizer found with the teacher {cfg.teacher}; assuming it uses the student's "
              "(set teacher_tokenizer to check)")
        return student_tokenizer


def load_model(name: str, *, dtype: torch.dtype, attn: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)


def output_width(model) -> int:
    """Number of logits the model outputs (its LM head's rows; may exceed the tokenizer by padding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_width: int, teacher_width: int) -> int:
    """The shared vocabulary size V, or a ValueError saying how the two vocabularies differ.

    OPD compares the two models' probabilities of the same token ids, so the tokenizers must map every token
    to the same id. The models' output widths may be larger than V (embedding padding); the loss then uses
    the first V columns of both (``vocab_size=V``).
    """
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))
        only_t = sorted(set(tv) - set(sv))
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])
        parts = [f"student has {len(sv)} tokens, teacher {len(tv)}"]
        if only_s:
            parts.append(f"{len(only_s)} only in the student (e.g. {only_s[:3]})")
        if only_t:
            parts.append(f"{len(only_t)} only in the teacher (e.g. {only_t[:3]})")
        if moved:
            parts.append(f"{len(moved)} with different ids (e.g. {moved[0]!r}: {sv[moved[0]]} vs {tv[moved[0]]})")
        raise ValueError(
            "the student and the teacher do not share a vocabulary (" + "; ".join(parts) + "). On-policy "
            "distillation compares the two models token id by token id, so pick a teacher and a student of the "
            "same tokenizer family (e.g. two Qwen3 models).")
    v = len(student_tokenizer)
    for role, width in (("student", student_width), ("teacher", teacher_width)):
        if width < v:
            raise ValueError(f"the {role} outputs {width} logits but the tokenizer has {v} tokens; "
                             "they do not belong together")
    return v


def eos_ids_of(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {int(tokenizer.eos_token_id)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return sorted(ids)


# ----------------------------------------------------------------------------------------------------------
# Rollouts: prompts -> sampled completions
# ----------------------------------------------------------------------------------------------------------


def format_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[str]:
    if not chat_template:
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


@dataclass
class Rollouts:
    """A batch of N = prompts x samples completions, as the forward passes need it.

    ``input_ids`` is the left-padded prompt (width P) followed by the completion (width C); ``targets`` is the
    completion with ``IGNORE_INDEX`` after the first EOS (the EOS itself is trained); ``segment_ids`` has -1
    there. ``position_ids`` count only real tokens, as ``generate`` did when sampling.
    """

    input_ids: torch.Tensor  # (N, P + C)
    attention_mask: torch.Tensor  # (N, P + C)
    position_ids: torch.Tensor  # (N, P + C)
    prompt_width: int  # P
    targets: torch.Tensor  # (N, C)
    lengths: torch.Tensor  # (N,) valid completion tokens (up to and including EOS)
    stopped: torch.Tensor  # (N,) bool: the completion ended with EOS
    texts: list  # decoded completions (special tokens skipped)
    segment_ids: torch.Tensor | None = None  # (N, C), -1 at ignored positions

    @property
    def valid(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], *, eos_ids: list[int], max_new_tokens: int,
                         do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         chat_template: bool = False, max_prompt_tokens: int = 512,
                         synced_gpus: bool = False) -> Rollouts:
    """Run ``model.generate`` on the prompts (left-padded) and package the result as :class:`Rollouts`.

    Sampling settings are passed explicitly (``top_k=0`` disables top-k even when the model's generation
    config sets one), so the rollouts come from the policy that the loss trains.
    """
    device = next(model.parameters()).device
    enc = tokenizer(format_prompts(tokenizer, prompts, chat_template), return_tensors="pt", padding=True,
                    padding_side="left", truncation=True, max_length=max_prompt_tokens,
                    add_special_tokens=not chat_template).to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else \
        dict(do_sample=False)
    out = model.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0, num_beams=1,
        synced_gpus=synced_gpus, **sampling)
    p = enc["input_ids"].shape[1]
    completion = out[:, p:]
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    upto_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # tokens before the first EOS, and the EOS
    targets = completion.masked_fill(~upto_eos, IGNORE_INDEX)
    attention_mask = torch.cat([enc["attention_mask"], upto_eos.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lengths = upto_eos.sum(-1)
    texts = tokenizer.batch_decode([c[:n].tolist() for c, n in zip(completion, lengths)], skip_special_tokens=True)
    return Rollouts(out, attention_mask, position_ids, p, targets, lengths, is_eos.any(-1), texts)


def add_segments(rollouts: Rollouts, tokenizer) -> Rollouts:
    """Sentence segment id of every completion token (docs/formulas.md §2), -1 at ignored positions."""
    from fastopd.segment import batch_token_segments

    completion = rollouts.input_ids[:, rollouts.prompt_width:].cpu()
    seg = batch_token_segments(tokenizer, completion, valid_lengths=rollouts.lengths.cpu().tolist(), pad_value=-1)
    rollouts.segment_ids = torch.from_numpy(seg).to(rollouts.targets.device)
    return rollouts


def completion_logits(model, rollouts: Rollouts) -> torch.Tensor:
    """(N, C, V) logits that predict the completion tokens: positions P-1 .. P+C-2 of the full sequence.

    Only the last C+1 positions go through the LM head (``logits_to_keep``) when the model supports it.
    """
    c = rollouts.targets.shape[1]
    kwargs = dict(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                  position_ids=rollouts.position_ids, use_cache=False)
    if _accepts(model, "logits_to_keep"):
        logits = model(**kwargs, logits_to_keep=c + 1).logits
    else:
        logits = model(**kwargs).logits[:, -(c + 1):]
    return logits[:, :-1]


def _accepts(model, arg: str) -> bool:
    import inspect

    base = model
    while hasattr(base, "module"):  # DDP / FSDP / compiled wrappers
        base = base.module
    return arg in inspect.signature(base.forward).parameters


@contextlib.contextmanager
def generation_model(accelerator, model):
    """The unwrapped model in eval mode, with FSDP parameters gathered; back to train mode afterwards."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    gather = contextlib.nullcontext()
    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        gather = FSDP.summon_full_params(model, writeback=False, recurse=False)
    try:
        with gather, accelerator.autocast():
            yield unwrapped
    finally:
        unwrapped.train(was_training)


def needs_synced_generation(accelerator) -> bool:
    """Sharded models must run the same number of forward passes on every process while generating."""
    from accelerate.utils import DistributedType

    return accelerator.num_processes > 1 and accelerator.distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: greedy decoding graded by a verifier
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], *, verifier, eos_ids: list[int], max_new_tokens: int,
             batch_size: int = 32, chat_template: bool = False, max_prompt_tokens: int = 512,
             accelerator=None) -> dict:
    """Greedy accuracy of ``model`` on ``rows`` (``{"prompt", "answer"}``), summed over processes.

    ``model`` is a plain (unwrapped) model; with an ``accelerator`` each process takes every
    ``num_processes``-th row and the counts are reduced. Returns ``accuracy``, ``correct``, ``total``,
    ``mean_length`` (tokens) and ``stop_rate`` (fraction that ended with EOS), and ``samples`` (the first
    three completions of this process).
    """
    from fastopd.train.verify import get_verifier

    check = get_verifier(verifier) if isinstance(verifier, str) else verifier
    rows = [r for r in rows if r.get("answer") is not None]
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = rows[rank::world]
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size) if rows else 0  # same on every process
    synced = accelerator is not None and needs_synced_generation(accelerator)
    was_training = model.training
    model.eval()
    correct = total = length = stopped = 0
    samples = []
    for i in range(n_batches):
        chunk = mine[i * batch_size:(i + 1) * batch_size]
        real = len(chunk)
        if real == 0:
            if not synced:
                break
            chunk = rows[:1]  # keep the collective generate calls in step; not counted
        out = generate_completions(
            model, tokenizer, [r["prompt"] for r in chunk], eos_ids=eos_ids, max_new_tokens=max_new_tokens,
            do_sample=False, chat_template=chat_template, max_prompt_tokens=max_prompt_tokens, synced_gpus=synced)
        for r, text in zip(chunk[:real], out.texts[:real]):
            correct += bool(check(text, r["answer"]))
        total += real
        length += int(out.lengths[:real].sum())
        stopped += int(out.stopped[:real].sum())
        samples.extend(out.texts[:max(0, 3 - len(samples))][:real])
    model.train(was_training)
    counts = torch.tensor([correct, total, length, stopped], dtype=torch.float64)
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    correct, total, length, stopped = counts.tolist()
    return {"accuracy": correct / max(total, 1), "correct": int(correct), "total": int(total),
            "mean_length": length / max(total, 1), "stop_rate": stopped / max(total, 1), "samples": samples}


# ----------------------------------------------------------------------------------------------------------
# Metrics of one optimizer step, summed over micro-batches and processes
# ----------------------------------------------------------------------------------------------------------


class StepTotals:
    """Sums of one step's diagnostics; ``reduce`` adds them up over processes and returns the means.

    The rule's diagnostics are :func:`fastopd.common.release_sums` added over micro-batches (and
    processes), turned into means by :func:`fastopd.common.release_means`: one definition for a batch,
    a step and the demo's logs.
    """

    KEYS = ("loss", "micro", "adv", "margin", "length", "stopped", "correct", "answered") + RELEASE_SUM_KEYS

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, out, rollouts: Rollouts, correct: int, answered: int) -> None:
        m, dec = out.metrics, out.release
        s = self.sums
        s["loss"] += float(out.loss.detach())
        s["micro"] += 1
        s["adv"] += m["adv_mean"] * m["num_valid"]
        s["margin"] += m["margin_mean"] * m["num_valid"]
        s["length"] += float(rollouts.lengths.sum())
        s["stopped"] += float(rollouts.stopped.sum())
        s["correct"] += correct
        s["answered"] += answered
        rule = dec.totals if dec is not None else release_sums([], [], [], m["num_valid"], m["num_kept"])
        rule = dict(rule, rollouts=float(len(rollouts.texts)))
        for key in RELEASE_SUM_KEYS:
            s[key] += rule[key]

    def reduce(self, accelerator) -> dict:
        vec = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64)
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
        s = dict(zip(self.KEYS, vec.tolist()))
        nan = float("nan")
        rule = release_means(s)
        return {
            "loss": s["loss"] / max(s["micro"], 1),
            "adv_mean": s["adv"] / max(s["valid"], 1),
            "margin_mean": s["margin"] / max(s["valid"], 1),
            "kept_fraction": rule["kept_fraction"],
            "accept_rate": rule["accept_rate"],
            "gain_mean": rule["gain_mean"],
            "release_position": rule["release_position"],
            "tokens": int(s["valid"]),
            "tokens_supervised": int(s["kept"]),
            "rollouts": int(s["rollouts"]),
            "completion_length": s["length"] / max(s["rollouts"], 1),
            "stop_rate": s["stopped"] / max(s["rollouts"], 1),
            "sample_accuracy": s["correct"] / s["answered"] if s["answered"] else nan,
        }


def rollout_records(step: int, out, rollouts: Rollouts, correct: list) -> list[dict]:
    """Per-rollout diagnostics for ``rollouts.jsonl`` (the plots of fastopd.train.report)."""
    dec = out.release
    margins = out.stats.margins.float().cpu().numpy()
    valid = rollouts.valid.cpu().numpy()
    seg = rollouts.segment_ids.cpu().numpy()
    offs = dec.series.offsets
    recs = []
    for b in range(len(rollouts.texts)):
        n = int(valid[b].sum())
        recs.append({
            "step": step,
            "length": n,
            "margins": np.round(margins[b][valid[b]].astype(np.float64), 5).tolist(),
            "segments": seg[b][valid[b]].tolist(),
            "series": np.round(dec.series.values[offs[b]:offs[b + 1]], 5).tolist(),
            "gain": float(dec.scan.gain[b]),
            "accepted": bool(dec.scan.accepted[b]),
            "release_segment": int(dec.release_segment[b]),
            "release_fraction": float(dec.release_fraction[b]),
            "kept_fraction": float(dec.kept_fraction[b]),
            "correct": correct[b],
            "text": rollouts.texts[b],
        })
    return recs


# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------


def prepare_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir)
    has_run = (out / "metrics.jsonl").exists() or bool(list_checkpoints(out))
    if has_run and cfg.overwrite:
        shutil.rmtree(out)
    elif has_run and not cfg.resume:
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                              "or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' own progress bars (weight loading/saving) so that the training bar stays readable."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.student`` by on-policy distillation from ``cfg.teacher``; return a summary dict.

    The summary holds ``output_dir``, ``step`` (the last step), ``eval`` (the last evaluation or None),
    ``time_per_step`` (seconds, mean over the steps this call ran), ``tokens`` (valid completion tokens
    over the run) and ``tokens_supervised`` (those with a non-zero weight).
    """
    with quiet_transformers():
        return _train(cfg)


@dataclass
class Run:
    """Everything one training step needs, built once by :func:`setup`."""

    cfg: TrainConfig
    accelerator: object
    tokenizer: object
    student: object
    teacher: object
    optimizer: object
    scheduler: object
    rule: ReleaseRule
    criterion: OPDLoss
    schedule: PromptSchedule
    train_rows: list
    eval_rows: list
    eos_ids: list
    verify: object
    log: RunLog
    start: int = 0
    last_eval: dict | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, models, data, optimizer, loss with the rule, and (on resume) the saved state."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        prepare_output_dir(cfg)
    accelerator.wait_for_everyone()
    device = accelerator.device
    resume_from = latest_checkpoint(cfg.output_dir) if cfg.resume else None

    # ---- models and tokenizer (a resumed run starts from the checkpoint's student)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, trust_remote_code=cfg.trust_remote_code)
    teacher_tokenizer = load_teacher_tokenizer(cfg, tokenizer)
    attn = attention_implementation(cfg.attn_implementation, device)
    student = load_model(str(resume_from / "student") if resume_from else cfg.student,
                         dtype=_dtype(cfg.student_dtype, "student", device), attn=attn,
                         trust_remote_code=cfg.trust_remote_code)
    teacher = load_model(cfg.teacher, dtype=_dtype(cfg.teacher_dtype, "teacher", device), attn=attn,
                         trust_remote_code=cfg.trust_remote_code)
    vocab_size = check_same_vocabulary(tokenizer, teacher_tokenizer, output_width(student), output_width(teacher))
    eos_ids = eos_ids_of(tokenizer, student)
    teacher.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:  # transformers 5 renamed it
        enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        enable()
    student.train()

    # ---- data
    train_rows = load_prompts(cfg.train_data, split=cfg.train_split, prompt_field=cfg.prompt_field,
                              answer_field=cfg.answer_field)
    eval_rows = []
    if cfg.eval_data:
        eval_rows = load_prompts(cfg.eval_data, split=cfg.eval_split, prompt_field=cfg.prompt_field,
                                 answer_field=cfg.answer_field)
        eval_rows = eval_rows[:cfg.eval_size] if cfg.eval_size else eval_rows
    schedule = PromptSchedule(len(train_rows), seed=cfg.seed, batch=cfg.prompts_per_step,
                              accum=cfg.grad_accum_steps, world=accelerator.num_processes,
                              rank=accelerator.process_index)
    verify = None
    if any(r["answer"] is not None for r in train_rows):
        from fastopd.train.verify import get_verifier

        verify = get_verifier(cfg.verifier)

    # ---- optimizer, schedule, loss with the release rule (or a control)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)  # stepped once per optimizer step, by us
    rule = ReleaseRule(mode=cfg.mode, k=cfg.k, temperature=cfg.loss_temperature, min_segments=cfg.min_segments,
                       min_gain=cfg.min_gain, fraction=cfg.fraction, seed=cfg.seed + accelerator.process_index,
                       backend=cfg.backend)
    criterion = OPDLoss(cfg.loss, ignore_index=IGNORE_INDEX, vocab_size=vocab_size, rule=rule)  # k, tau: the rule's

    # ---- resume: optimizer, scheduler, RNG, logs
    run = Run(cfg, accelerator, tokenizer, student, teacher, optimizer, scheduler, rule, criterion, schedule,
              train_rows, eval_rows, eos_ids, verify, RunLog(cfg.output_dir, enabled=accelerator.is_main_process))
    if resume_from is not None:
        run.start = load_training_state(accelerator, resume_from, student=student, optimizer=optimizer,
                                        scheduler=scheduler, rule=rule)
        run.log.truncate(run.start)
        accelerator.print(f"resumed from {resume_from} at step {run.start}")
    else:
        set_seed(cfg.seed, device_specific=True)  # seed + process index
        run.log.truncate(0)
    if run.main:
        (Path(cfg.output_dir) / "config.yaml").write_text(cfg.to_yaml())
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers("fastopd", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                     for k, v in cfg.to_dict().items()})
    return run


def micro_step(run: Run, step: int, micro: int, totals: StepTotals, phase: dict | None = None) -> tuple[float, float]:
    """Steps 1-6 of the module docstring on one micro-batch; returns (generation seconds, grad norm or NaN).

    ``phase``: a dict to which the seconds of each of :data:`PHASES` are added."""
    cfg, accelerator, student = run.cfg, run.accelerator, run.student
    phase = dict.fromkeys(PHASES, 0.0) if phase is None else phase
    device = accelerator.device
    # 1. this micro-batch's prompts, each num_samples times
    rows = [run.train_rows[i] for i in run.schedule.indices(step, micro)]
    prompts = [r["prompt"] for r in rows for _ in range(cfg.num_samples)]
    answers = [r["answer"] for r in rows for _ in range(cfg.num_samples)]
    # 2. the student samples completions (eval mode, no grad, unwrapped)
    t0 = time.perf_counter()
    with generation_model(accelerator, student) as model:
        rollouts = generate_completions(
            model, run.tokenizer, prompts, eos_ids=run.eos_ids, max_new_tokens=cfg.max_new_tokens,
            do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            chat_template=cfg.chat_template, max_prompt_tokens=cfg.max_prompt_tokens,
            synced_gpus=needs_synced_generation(accelerator))
    t_gen = time.perf_counter() - t0
    # 3. sentence segments per completion token
    t0 = _now(device)
    add_segments(rollouts, run.tokenizer)
    phase["time_rule"] += _now(device) - t0
    grad_norm = float("nan")
    with accelerator.accumulate(student):
        # 4-5. teacher scores (no grad), student forward (grad), completion positions only; release rule ->
        # weights -> loss (on-policy: old_logprobs = None)
        t0 = _now(device)
        times: dict = {}
        out = completion_loss(run, rollouts, times=times)
        t2 = _now(device)
        rule_s = out.release.elapsed_s if out.release is not None else 0.0
        phase["time_teacher"] += times.get("teacher", 0.0)
        phase["time_rule"] += rule_s
        phase["time_student_forward"] += t2 - t0 - times.get("teacher", 0.0) - rule_s  # student + loss forward
        # 6. backward; the optimizer acts once per grad_accum_steps micro-batches
        accelerator.backward(out.loss)
        t3 = _now(device)
        phase["time_backward"] += t3 - t2
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm or float("inf"))
            grad_norm = float(norm) if norm is not None else float("nan")
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        phase["time_optimizer"] += _now(device) - t3
    # diagnostics of this micro-batch (for step 7)
    verify = run.verify
    correct = [bool(verify(t, a)) if (verify and a is not None) else None for t, a in zip(rollouts.texts, answers)]
    totals.add(out, rollouts, sum(c is True for c in correct), sum(c is not None for c in correct))
    if cfg.log_rollouts and run.main:
        for rec in rollout_records(step, out, rollouts, correct):
            run.log.write("rollouts.jsonl", rec)
    return t_gen, grad_norm


def completion_loss(run: Run, rollouts: Rollouts, times: dict | None = None):
    """Steps 4-5: both models score the completions, the rule decides the weights, the loss is returned.

    ``loss_from="hidden"`` (default): final hidden states + LM heads (:func:`fastopd.train.hidden.hidden_loss`),
    in token chunks, so no (N, C, V) tensor exists; ``"logits"``: both models' completion logits.
    ``times``: a dict that receives ``"teacher"``, the seconds of the teacher's forward.
    """
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.loss_from == "hidden":
        return hidden_loss(run.criterion, run.student, run.teacher, rollouts, autocast=accelerator.autocast,
                           chunk_size=cfg.loss_chunk_size or None, times=times)
    device = getattr(accelerator, "device", None)
    t0 = _now(device)
    with torch.no_grad(), accelerator.autocast():
        teacher_logits = completion_logits(run.teacher, rollouts)
    if times is not None:
        times["teacher"] = _now(device) - t0
    student_logits = completion_logits(run.student, rollouts)
    return run.criterion(student_logits, teacher_logits, rollouts.targets, segment_ids=rollouts.segment_ids)


def train_step(run: Run, step: int) -> dict:
    """One optimizer step: ``grad_accum_steps`` micro-batches (steps 1-6), then their metrics (step 7)."""
    t_step = time.perf_counter()
    totals = StepTotals()
    t_gen, grad_norm = 0.0, float("nan")
    phase = dict.fromkeys(PHASES, 0.0)  # seconds per phase of this step
    for micro in range(run.cfg.grad_accum_steps):
        t, norm = micro_step(run, step, micro, totals, phase)
        t_gen += t
        grad_norm = norm if not math.isnan(norm) else grad_norm
    metrics = totals.reduce(run.accelerator)
    step_time = time.perf_counter() - t_step  # rollouts + scoring + update; evaluation and saving excluded
    metrics.update(lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm, time_generate=t_gen, time_step=step_time,
                   **phase)
    return metrics


def run_eval(run: Run, step: int) -> dict | None:
    """Greedy evaluation on the eval rows, written to ``eval.jsonl``; None without eval data."""
    cfg, accelerator = run.cfg, run.accelerator
    if not run.eval_rows:
        return None
    with generation_model(accelerator, run.student) as model:
        res = evaluate(model, run.tokenizer, run.eval_rows, verifier=cfg.verifier, eos_ids=run.eos_ids,
                       max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                       batch_size=cfg.eval_batch_size, chat_template=cfg.chat_template,
                       max_prompt_tokens=cfg.max_prompt_tokens, accelerator=accelerator)
    row = {"step": step, **{k: v for k, v in res.items() if k != "samples"}, "samples": res["samples"]}
    run.log.write("eval.jsonl", row)
    accelerator.log({"eval/accuracy": res["accuracy"]}, step=step)
    return row


def finish_step(run: Run, step: int, metrics: dict, bar) -> None:
    """Step 7: evaluate when due, log the step (JSONL, trackers, tqdm), checkpoint when due."""
    cfg = run.cfg
    if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
        run.last_eval = run_eval(run, step)
        if run.last_eval is not None:
            metrics["eval_accuracy"] = run.last_eval["accuracy"]
    run.log.write("metrics.jsonl", {"step": step, **metrics})
    run.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    if bar is not None:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", adv=f"{metrics['adv_mean']:.3f}",
                        kept=f"{metrics['kept_fraction']:.2f}", accept=f"{metrics['accept_rate']:.2f}",
                        refresh=False)
        bar.update(1)
    if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
        save_checkpoint(run.accelerator, step=step, output_dir=cfg.output_dir, student=run.student,
                        tokenizer=run.tokenizer, optimizer=run.optimizer, scheduler=run.scheduler, rule=run.rule,
                        keep_last=cfg.keep_last, extra={"mode": cfg.mode, "seed": cfg.seed})


def _train(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    accelerator = run.accelerator
    if run.start == 0 and cfg.eval_at_start:
        run.last_eval = run_eval(run, 0)
    bar = None
    if run.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=run.start, desc=f"OPD ({cfg.mode})", dynamic_ncols=True)
    step_times = []
    for step in range(run.start + 1, cfg.steps + 1):
        metrics = train_step(run, step)
        step_times.append(metrics["time_step"])
        finish_step(run, step, metrics, bar)
    if bar is not None:
        bar.close()

    final_step = max(run.start, cfg.steps)
    if run.main:
        final_ckpt = latest_checkpoint(cfg.output_dir)
        if final_ckpt is not None:
            _copy_final(final_ckpt / "student", Path(cfg.output_dir) / "final")
    accelerator.wait_for_everyone()
    rows = read_log(Path(cfg.output_dir) / "metrics.jsonl") if run.main else []
    summary = {
        "output_dir": str(cfg.output_dir),
        "step": final_step,
        "eval": run.last_eval,
        "time_per_step": float(np.mean(step_times)) if step_times else float("nan"),
        "tokens": int(sum(r.get("tokens", 0) for r in rows)),
        "tokens_supervised": int(sum(r.get("tokens_supervised", 0) for r in rows)),
    }
    accelerator.end_training()
    _release_accelerator(accelerator)
    return summary


PHASES = ("time_teacher", "time_student_forward", "time_rule", "time_backward", "time_optimizer")
"""Per-step phase timings (seconds, summed over micro-batches) logged with ``time_generate`` and ``time_step``:
teacher scoring; student forward + loss forward; the rule (segmentation + segment means + scan + weights);
backward; clipping + optimizer + scheduler step. On CUDA each boundary synchronises the device."""


def _now(device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished (CUDA), so phases do not bleed."""
    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _copy_final(src: Path, dst: Path) -> None:
    """``<output_dir>/final``: a copy of the last checkpoint's student (written as ``final.tmp``, then swapped in)."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _release_accelerator(accelerator) -> None:
    """Let a later ``train`` call in the same process build a fresh Accelerator (tests, the demo)."""
    from accelerate.state import AcceleratorState, GradientState

    if accelerator.num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
