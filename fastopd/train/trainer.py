"""On-policy distillation of a Hugging Face causal LM, with the release rule: the step and the loop.

Models and tokenizers are loaded by :mod:`fastopd.train.models`; rollouts are sampled, segmented, scored and
evaluated by :mod:`fastopd.train.rollouts`.

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
from fastopd.train.checkpoint import latest_checkpoint, load_training_state, resume_checkpoint, save_checkpoint
from fastopd.train.config import TrainConfig
from fastopd.train.data import PromptSchedule, load_prompts
from fastopd.train.hidden import hidden_loss
from fastopd.train.online import online_loss, online_rollouts
from fastopd.train.outdir import prepare_output_dir
from fastopd.train.models import (
    attention_implementation, check_same_vocabulary, choose_dtype, load_model, load_teacher_tokenizer,
    load_tokenizer, output_width, quiet_transformers,
)
from fastopd.train.rollouts import (
    IGNORE_INDEX, Rollouts, add_segments, completion_logits, eos_ids_of, evaluate, generate_completions,
    generation_model, needs_synced_generation, rollout_records,
)
from fastopd.train.runlog import RunLog, read_log


# ----------------------------------------------------------------------------------------------------------
# Set-up: the accelerator
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
    # what the step cost (Rollouts.counts; docs/training.md): sampled tokens, sampling rows x steps, teacher
    # tokens (scored while sampling + forwarded for the loss), student positions forwarded for the loss, the
    # rollouts the online rule stopped, the teacher's and the rule's seconds while sampling
    COST_KEYS = ("generated", "decode_rows", "teacher_scored", "teacher_forwarded", "student_forwarded",
                 "online_stopped", "time_generate_teacher", "time_generate_rule")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS + self.COST_KEYS, 0.0)

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
        counts = rollouts.counts
        s["generated"] += counts.get("generated", float(rollouts.lengths.sum()))
        s["student_forwarded"] += counts.get("student_forwarded", float(rollouts.targets.numel()))
        for key in ("decode_rows", "teacher_scored", "teacher_forwarded"):
            s[key] += counts.get(key, 0)
        if rollouts.online is not None:
            s["online_stopped"] += float(rollouts.online.decision.stopped.sum())
            s["time_generate_teacher"] += rollouts.online.time_teacher
            s["time_generate_rule"] += rollouts.online.time_rule

    def reduce(self, accelerator) -> dict:
        keys = self.KEYS + self.COST_KEYS
        vec = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
        s = dict(zip(keys, vec.tolist()))
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
            "tokens_generated": int(s["generated"]),
            "generate_row_steps": int(s["decode_rows"]),
            "teacher_tokens": int(s["teacher_scored"] + s["teacher_forwarded"]),
            "teacher_tokens_sampling": int(s["teacher_scored"]),
            "student_tokens_forwarded": int(s["student_forwarded"]),
            "online_stop_rate": s["online_stopped"] / max(s["rollouts"], 1),
            "time_generate_teacher": s["time_generate_teacher"] / max(accelerator.num_processes, 1),
            "time_generate_rule": s["time_generate_rule"] / max(accelerator.num_processes, 1),
        }



# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------


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
    resume_from = resume_checkpoint(cfg.output_dir, log=accelerator.print) if cfg.resume else None

    # ---- models and tokenizer (a resumed run starts from the checkpoint's student)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, trust_remote_code=cfg.trust_remote_code)
    teacher_tokenizer = load_teacher_tokenizer(cfg, tokenizer)
    attn = attention_implementation(cfg.attn_implementation, device)
    student = load_model(str(resume_from / "student") if resume_from else cfg.student,
                         dtype=choose_dtype(cfg.student_dtype, "student", device), attn=attn,
                         trust_remote_code=cfg.trust_remote_code)
    teacher = load_model(cfg.teacher, dtype=choose_dtype(cfg.teacher_dtype, "teacher", device), attn=attn,
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
    rule = ReleaseRule(mode={"sft": "full", "online": "release"}.get(cfg.mode, cfg.mode), k=cfg.k, temperature=cfg.loss_temperature, min_segments=cfg.min_segments,
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
    # 2. the student samples completions (eval mode, no grad, unwrapped); the sft baseline: the teacher
    t0 = time.perf_counter()
    with generation_model(accelerator, run.teacher if cfg.mode == "sft" else student) as model:
        rollouts = online_rollouts(run, model, prompts) if cfg.mode == "online" else generate_completions(
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
        out = sft_loss(run, rollouts) if cfg.mode == "sft" else completion_loss(run, rollouts, times=times)
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
    if cfg.log_rollouts and run.main and out.release is not None:
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
    if getattr(cfg, "mode", None) == "online":  # weights decided while sampling; the forwards read the kept prefix
        return online_loss(run, rollouts, times=times)
    rollouts.counts.update(teacher_forwarded=rollouts.targets.numel(), student_forwarded=rollouts.targets.numel())
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


@dataclass
class SFTOutput:
    """What :func:`sft_loss` returns: the fields of an ``OPDOutput`` that the step reads (no teacher, no rule)."""

    loss: torch.Tensor
    metrics: dict
    release: None = None
    stats: None = None


def sft_loss(run: Run, rollouts: Rollouts) -> SFTOutput:
    """The ``sft`` baseline's loss: the student's mean cross-entropy on the (teacher-sampled) completion tokens,
    normalised per token like the OPD loss (docs/formulas.md §5: Σ_t ℓ_t / Σ valid_t)."""
    logits = completion_logits(run.student, rollouts)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), rollouts.targets.flatten(),
                                             ignore_index=IGNORE_INDEX)
    n = int(rollouts.valid.sum())
    nan = float("nan")
    return SFTOutput(loss, {"adv_mean": nan, "margin_mean": nan, "num_valid": n, "num_kept": n})


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
