"""On-policy distillation of a Hugging Face causal LM, with the release rule: one training step, and the loop.

A step makes three independent choices (docs/formulas.md §8; ``TrainConfig.sampler`` / ``weights`` / ``loss``,
or the ``mode`` shorthand): **who samples** (the student with HF ``generate``, the student stopping at the
online release, the teacher), **which tokens count** (the release rule or a control: full, fixed_prefix, random,
shuffled) and **which loss** (pg, reverse_kl, forward_kl, or cross_entropy). One optimizer step
(:func:`train_step`) runs ``grad_accum_steps`` micro-batches of :func:`micro_step`, read top to bottom:

1. **sample**: ``prompts_per_step`` prompts (:class:`fastopd.train.data.PromptSchedule`), ``num_samples`` rollouts
   each, from the sampler (:data:`SAMPLERS`: :func:`fastopd.train.rollouts.generate_completions`, or
   :func:`fastopd.train.online_sampler.sample_online_run`, which returns the rule's stops and weights too);
2. **which tokens count** (:func:`step_weights`): the weights the sampler decided (online), or the rule -- it reads
   the teacher's margins from the loss's own statistics pass, per sentence segment
   (``fastopd.segment.batch_token_segments``) -- or every token (cross_entropy);
3. **score and loss** (:func:`completion_loss`): the teacher scores the completions under ``no_grad``, the student
   runs forward with gradients, and :class:`fastopd.OPDLoss` returns the loss with those weights (by default from
   both models' final hidden states and LM heads, ``fastopd.train.hidden``, so that no (N, C, V) logits exist;
   ``loss_from="logits"``: ``completion_logits``); cross_entropy reads the student alone;
4. **update**: backward; after ``grad_accum_steps`` micro-batches: clip, AdamW step, LR schedule step;
5. log (JSONL, tqdm, TensorBoard), evaluate (greedy decoding + a verifier), checkpoint (:func:`finish_step`).

Everything the step needs is built once by :func:`fastopd.train.setup.setup`. The same code runs on one CPU, one
GPU, or several processes under ``accelerate launch`` (DDP or FSDP): the student goes through
``accelerator.prepare``; generation runs on ``accelerator.unwrap_model(student)``; metrics are summed over
processes (:class:`fastopd.train.totals.StepTotals`). No OPD formula lives here: the weights and the loss come
from :class:`fastopd.ReleaseRule` and :class:`fastopd.OPDLoss` (cross_entropy is torch's).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fastopd.train.checkpoint import latest_checkpoint, save_checkpoint
from fastopd.train.config import TrainConfig
from fastopd.train.hidden import hidden_loss
from fastopd.train.models import quiet_transformers
from fastopd.train.online_sampler import online_metrics, sample_online_run
from fastopd.train.rollouts import (
    IGNORE_INDEX, Rollouts, add_segments, completion_logits, evaluate, generate_completions, generation_model,
    kept_rollouts, needs_synced_generation, rollout_records,
)
from fastopd.train.runlog import read_log
from fastopd.train.setup import Run, setup
from fastopd.train.totals import StepTotals


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.student`` by on-policy distillation from ``cfg.teacher``; return a summary dict.

    The summary holds ``output_dir``, ``step`` (the last step), ``eval`` (the last evaluation or None),
    ``time_per_step`` (seconds, mean over the steps this call ran), ``tokens`` (valid completion tokens
    over the run) and ``tokens_supervised`` (those with a non-zero weight).
    """
    with quiet_transformers():
        return _train(cfg)


# ----------------------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------------------


def _generate(run: Run, model, prompts: list[str]) -> Rollouts:
    cfg = run.cfg
    return generate_completions(
        model, run.tokenizer, prompts, eos_ids=run.eos_ids, max_new_tokens=cfg.max_new_tokens, do_sample=True,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, chat_template=cfg.chat_template,
        max_prompt_tokens=cfg.max_prompt_tokens, synced_gpus=needs_synced_generation(run.accelerator))


SAMPLERS = {
    "student": ("student", _generate),
    "online": ("student", sample_online_run),
    "teacher": ("teacher", _generate),
}
"""Who samples: sampler name -> (the model that samples, ``fn(run, unwrapped_model, prompts) -> Rollouts``)."""


def sample(run: Run, prompts: list[str]) -> Rollouts:
    """Step 1: the sampler's rollouts of ``prompts`` (the model unwrapped, in eval mode, without gradients)."""
    which, fn = SAMPLERS[run.choices[0]]
    with generation_model(run.accelerator, getattr(run, which)) as model:
        return fn(run, model, prompts)


def step_weights(run: Run, rollouts: Rollouts):
    """Step 2, which tokens count: a per-token tensor decided before the loss (the online sampler's), the rule
    (release and its controls read the teacher's margins inside the loss pass: the rollouts get their sentence
    segments here), or None (every valid token: cross_entropy)."""
    if rollouts.online is not None:
        return rollouts.online.weights
    if run.choices[2] == "cross_entropy":
        return None
    add_segments(rollouts, run.tokenizer)
    return run.rule


def completion_loss(run: Run, rollouts: Rollouts, weights=None, times: dict | None = None):
    """Step 3: the teacher scores the completions, the student runs forward, the loss comes back with ``weights``.

    ``weights``: what :func:`step_weights` returned. A tensor was decided before the loss: only each rollout's
    weighted prefix is forwarded (:func:`fastopd.train.rollouts.kept_rollouts`), and the loss is divided by the
    valid tokens of the whole rollouts, so it equals the loss with those weights on the whole rollouts. The rule
    (``run.criterion.rule``) decides from the margins of this same pass. ``loss_from="hidden"`` (default): final
    hidden states + LM heads (:func:`fastopd.train.hidden.hidden_loss`), in token chunks, so no (N, C, V) tensor
    exists; ``"logits"``: both models' completion logits. ``times``: a dict that receives ``"teacher"``, the
    seconds of the teacher's forward.
    """
    cfg, accelerator = run.cfg, run.accelerator
    if run.choices[2] == "cross_entropy":
        return cross_entropy_loss(run, rollouts)
    whole, normalizer, tensor = rollouts, None, isinstance(weights, torch.Tensor)
    if tensor:
        normalizer = max(float(rollouts.valid.sum()), 1.0)
        rollouts = kept_rollouts(rollouts, weights)
        weights = weights[:, :rollouts.targets.shape[1]].to(rollouts.targets.device)
    whole.counts.update(teacher_forwarded=int(rollouts.targets.numel()),
                        student_forwarded=int(rollouts.targets.numel()))
    if run.served is not None:  # the teacher's log-probs from its server; the student's completion logits
        from fastopd.integrations.served_teacher import served_completion_loss

        out = served_completion_loss(run.served, run.student, rollouts, loss=run.choices[2],
                                     rule=None if tensor else weights, weights=weights if tensor else None,
                                     normalizer=normalizer, k=cfg.k, ignore_index=IGNORE_INDEX,
                                     vocab_size=run.served.vocab_size, times=times)
    elif cfg.loss_from == "hidden":
        out = hidden_loss(run.criterion, run.student, run.teacher, rollouts, autocast=accelerator.autocast,
                          chunk_size=cfg.loss_chunk_size or None, times=times, weights=weights if tensor else None,
                          normalizer=normalizer)
    else:
        device = getattr(accelerator, "device", None)
        t0 = _now(device)
        with torch.no_grad(), accelerator.autocast():
            teacher_logits = completion_logits(run.teacher, rollouts)
        if times is not None:
            times["teacher"] = _now(device) - t0
        student_logits = completion_logits(run.student, rollouts)
        given = dict(weights=weights, normalizer=normalizer) if tensor else dict(segment_ids=rollouts.segment_ids)
        out = run.criterion(student_logits, teacher_logits, rollouts.targets, **given)
    if whole.online is not None:
        online_metrics(out, whole)
    return out


class CrossEntropyOutput:
    """What :func:`cross_entropy_loss` returns: the fields of an ``OPDOutput`` that the step reads (no teacher)."""

    release = None
    stats = None

    def __init__(self, loss: torch.Tensor, metrics: dict):
        self.loss, self.metrics = loss, metrics


def cross_entropy_loss(run: Run, rollouts: Rollouts) -> CrossEntropyOutput:
    """Loss cross_entropy: the student's mean cross-entropy on the sampled completion tokens (with the teacher
    sampling: the ``sft`` baseline), normalised per token like the OPD loss (docs/formulas.md §5:
    Σ_t ℓ_t / Σ valid_t)."""
    logits = completion_logits(run.student, rollouts)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), rollouts.targets.flatten(),
                                             ignore_index=IGNORE_INDEX)
    n = int(rollouts.valid.sum())
    nan = float("nan")
    return CrossEntropyOutput(loss, {"adv_mean": nan, "margin_mean": nan, "num_valid": n, "num_kept": n})


def micro_step(run: Run, step: int, micro: int, totals: StepTotals, phase: dict | None = None) -> tuple[float, float]:
    """Steps 1-4 of the module docstring on one micro-batch; returns (sampling seconds, grad norm or NaN).

    ``phase``: a dict to which the seconds of each of :data:`PHASES` are added."""
    cfg, accelerator, student = run.cfg, run.accelerator, run.student
    phase = dict.fromkeys(PHASES, 0.0) if phase is None else phase
    device = accelerator.device
    rows = [run.train_rows[i] for i in run.schedule.indices(step, micro)]
    prompts = [r["prompt"] for r in rows for _ in range(cfg.num_samples)]
    answers = [r["answer"] for r in rows for _ in range(cfg.num_samples)]
    # 1. sample
    t0 = time.perf_counter()
    rollouts = sample(run, prompts)
    t_gen = time.perf_counter() - t0
    # 2. which tokens count
    t0 = _now(device)
    weights = step_weights(run, rollouts)
    phase["time_rule"] += _now(device) - t0
    grad_norm = float("nan")
    with accelerator.accumulate(student):
        # 3. score and loss (on-policy: old_logprobs = None)
        t0 = _now(device)
        times: dict = {}
        out = completion_loss(run, rollouts, weights, times=times)
        t2 = _now(device)
        rule_s = out.release.elapsed_s if out.release is not None else 0.0
        if rollouts.online is not None:  # decided while sampling, outside this interval
            phase["time_rule"] += rule_s
            rule_s = 0.0
        phase["time_teacher"] += times.get("teacher", 0.0)
        phase["time_rule"] += rule_s
        phase["time_student_forward"] += t2 - t0 - times.get("teacher", 0.0) - rule_s  # student + loss forward
        # 4. backward; the optimizer acts once per grad_accum_steps micro-batches
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
    # diagnostics of this micro-batch (for step 5)
    verify = run.verify
    correct = [bool(verify(t, a)) if (verify and a is not None) else None for t, a in zip(rollouts.texts, answers)]
    totals.add(out, rollouts, sum(c is True for c in correct), sum(c is not None for c in correct))
    if cfg.log_rollouts and run.main and out.release is not None:
        for rec in rollout_records(step, out, rollouts, correct):
            run.log.write("rollouts.jsonl", rec)
    return t_gen, grad_norm


def train_step(run: Run, step: int) -> dict:
    """One optimizer step: ``grad_accum_steps`` micro-batches (steps 1-4), then their metrics (step 5)."""
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


# ----------------------------------------------------------------------------------------------------------
# The loop: evaluation, logging, checkpoints
# ----------------------------------------------------------------------------------------------------------


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


def eval_line(step: int, ev: dict, cfg: TrainConfig) -> str:
    """``step N: eval accuracy 48.0% (48/100)``, or "not graded" when no eval row has an answer."""
    if ev["total"]:
        return f"step {step}: eval accuracy {ev['accuracy']:.1%} ({ev['correct']}/{ev['total']})"
    return f"step {step}: eval not graded (no row of eval_data has an `{cfg.answer_field}`)"


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
                        keep_last=cfg.keep_last, extra={"mode": cfg.label, "seed": cfg.seed})


def _train(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    accelerator = run.accelerator
    if run.start == 0 and cfg.eval_at_start:
        run.last_eval = run_eval(run, 0)
        if run.last_eval is not None:  # the starting point, before any step
            accelerator.print(eval_line(0, run.last_eval, cfg))
    bar = None
    if run.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=run.start, desc=f"OPD ({cfg.label})", dynamic_ncols=True)
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
