"""Everything a training step needs, built once: the accelerator, models, data, optimizer, the loss with its
rule, and (on resume) the saved state (:func:`setup` returns a :class:`Run`)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastopd.loss import OPDLoss
from fastopd.release import ReleaseRule
from fastopd.train.checkpoint import load_training_state, resume_checkpoint
from fastopd.train.config import TrainConfig, is_served
from fastopd.train.data import PromptSchedule, load_prompts
from fastopd.train.outdir import prepare_output_dir
from fastopd.train.models import (
    attention_implementation, check_same_vocabulary, choose_dtype, load_model, load_teacher_tokenizer,
    load_tokenizer, output_width,
)
from fastopd.train.rollouts import IGNORE_INDEX, eos_ids_of
from fastopd.train.runlog import RunLog


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


@dataclass
class Run:
    """Everything one training step needs, built once by :func:`setup`."""

    cfg: TrainConfig
    accelerator: object
    tokenizer: object
    student: object
    teacher: object  # None when the teacher is served (``served``)
    optimizer: object
    scheduler: object
    rule: ReleaseRule  # which tokens count (docs/formulas.md §4); its RNG is checkpointed
    criterion: OPDLoss | None  # the loss, with the rule unless the sampler decided the weights; None: cross_entropy
    schedule: PromptSchedule
    train_rows: list
    eval_rows: list
    eos_ids: list
    verify: object
    log: RunLog
    start: int = 0
    last_eval: dict | None = None
    served: object = None  # fastopd.integrations.served_teacher.ServedTeacher when teacher is http://...

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def choices(self) -> tuple[str, str, str]:
        """(sampler, weights, loss): the step's three choices (docs/formulas.md §8)."""
        return self.cfg.choices


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, models, data, optimizer, loss with the rule, and (on resume) the saved state."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # a served teacher (teacher: http://...) is checked before anything is made: its model and vocabulary
    served = None
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, trust_remote_code=cfg.trust_remote_code)
    if is_served(cfg.teacher):
        from fastopd.integrations.served_teacher import ServedTeacher

        served = ServedTeacher(cfg.teacher, k=cfg.teacher_topk, tokenizer=tokenizer, timeout=cfg.teacher_timeout)
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        prepare_output_dir(cfg)
    accelerator.wait_for_everyone()
    device = accelerator.device
    resume_from = resume_checkpoint(cfg.output_dir, log=accelerator.print) if cfg.resume else None

    # ---- models (a resumed run starts from the checkpoint's student; a served teacher is not loaded here)
    attn = attention_implementation(cfg.attn_implementation, device)
    student = load_model(str(resume_from / "student") if resume_from else cfg.student,
                         dtype=choose_dtype(cfg.student_dtype, "student", device), attn=attn,
                         trust_remote_code=cfg.trust_remote_code)
    teacher = None
    if served is None:
        teacher = load_model(cfg.teacher, dtype=choose_dtype(cfg.teacher_dtype, "teacher", device), attn=attn,
                             trust_remote_code=cfg.trust_remote_code)
        vocab_size = check_same_vocabulary(tokenizer, load_teacher_tokenizer(cfg, tokenizer), output_width(student),
                                           output_width(teacher))
        teacher.requires_grad_(False).eval()
    else:
        vocab_size = served.vocab_size  # the client checked the server's vocabulary against the tokenizer's
    eos_ids = eos_ids_of(tokenizer, student)
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
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)  # stepped once per optimizer step, by us
    # which tokens count: the rule (or a control) reads the teacher's margins inside the loss pass; with
    # sampler online it decided while sampling, so the loss takes its weights (no rule)
    sampler, weights, loss = cfg.choices
    rule = ReleaseRule(mode=weights, k=cfg.k, temperature=cfg.loss_temperature, min_segments=cfg.min_segments,
                       min_gain=cfg.min_gain, fraction=cfg.fraction, seed=cfg.seed + accelerator.process_index,
                       backend=cfg.backend)
    criterion = None  # loss cross_entropy: no teacher, no OPD loss; a served teacher: fastopd.served_opd_loss
    if loss != "cross_entropy" and served is None:
        criterion = OPDLoss(loss, k=cfg.k, temperature=cfg.loss_temperature, ignore_index=IGNORE_INDEX,
                            vocab_size=vocab_size, backend=cfg.backend, rule=None if sampler == "online" else rule)

    # ---- resume: optimizer, scheduler, RNG, logs
    run = Run(cfg, accelerator, tokenizer, student, teacher, optimizer, scheduler, rule, criterion, schedule,
              train_rows, eval_rows, eos_ids, verify, RunLog(cfg.output_dir, enabled=accelerator.is_main_process),
              served=served)
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


