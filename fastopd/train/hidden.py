"""What the trainer hands the hidden-state loss (docs/formulas.md §6): final hidden states and LM heads.

- :func:`completion_hidden`: (N, C, H) final hidden states (after the final norm) at the positions whose
  logits predict the completion tokens, P-1 .. P+C-2 -- exactly what the LM head maps to the trainer's
  former ``completion_logits``. The model runs through its wrapper (DDP/FSDP hooks fire) with
  ``output_hidden_states=True`` and ``logits_to_keep=1``, so its own head projects one position per row: an
  (N, 1, V) tensor, never (N, C, V).
- :func:`lm_head`: the model's output-embedding weight and bias, and the logit scale (:func:`logit_scale`,
  TRL's rules) and final-logit soft-cap (Gemma ``final_logit_softcapping``) from its config, as
  :class:`LMHead`.

FSDP: the head weight outside the wrapped forward is a shard. Under FSDP2 it is a DTensor and
:func:`lm_head` gathers it with ``full_tensor()`` (differentiable: the gradient is reduce-scattered back to
the shard), once per step for all chunks. FSDP1 keeps flat parameters whose original views are not usable
outside the forward; the hidden-state loss is refused there (use FSDP2, or ``loss_from="logits"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LMHead:
    """One model's LM head as :func:`fastopd.linear_opd_loss` takes it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def _unwrap(model):
    base = model
    while hasattr(base, "module"):  # DDP / FSDP1 / compiled wrappers
        base = base.module
    return base


def _accepts(model, arg: str) -> bool:
    import inspect

    return arg in inspect.signature(_unwrap(model).forward).parameters


def completion_hidden(model, rollouts) -> torch.Tensor:
    """(N, C, H) final hidden states whose head outputs predict the completion tokens (positions P-1 .. P+C-2).

    ``model(..., output_hidden_states=True).hidden_states[-1]`` is the last layer's output after the final
    norm (what the LM head reads) in Hugging Face decoder models; ``logits_to_keep=1`` keeps the model's
    own head to one position per row.
    """
    c = rollouts.targets.shape[1]
    kwargs = dict(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                  position_ids=rollouts.position_ids, use_cache=False, output_hidden_states=True)
    if not _accepts(model, "logits_to_keep"):
        raise ValueError(
            f"{type(_unwrap(model)).__name__}.forward has no logits_to_keep: it would build (N, P + C, V) logits; "
            "use loss_from='logits' for this model"
        )
    out = model(**kwargs, logits_to_keep=1)
    return out.hidden_states[-1][:, -(c + 1):-1]


def lm_head(model, dtype: torch.dtype | None = None) -> LMHead:
    """The model's LM head (weight, bias, logit scale, soft-cap), the weight gathered if FSDP2 shards it.

    ``dtype``: cast weight and bias to it (the hidden states' dtype under mixed precision); the cast is
    differentiable, so a student's gradient reaches the parameter in its own dtype.
    """
    base = _unwrap(model)
    head = base.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(base).__name__} has no output embedding (LM head) weight")
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.dim() != 2 or weight.numel() == 0:  # e.g. an FSDP1 flat-parameter view outside the forward
        raise ValueError(
            f"the LM head weight has shape {tuple(weight.shape)}, not (V, H): a sharded FSDP1 parameter? "
            "use FSDP2 or loss_from='logits'"
        )
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    if dtype is not None:
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    cfg = getattr(base, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(weight, bias, logit_scale(cfg), float(softcap) if softcap else None)


def logit_scale(config) -> float:
    """The multiplier a model applies to its logits, by the rules of TRL's ``DistillationTrainer._compute_loss``
    (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``); 1.0 when none is set."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        ls = config.logits_scaling
        scale = ls if getattr(config, "model_type", None) == "hyperclovax" else 1 / ls
    return 1.0 if scale is None else float(scale)


def hidden_loss(criterion, student, teacher, rollouts, *, autocast=None, chunk_size: int | None = None,
                times: dict | None = None):
    """Steps 4-5 of a training step from hidden states: the teacher's final hidden states under ``no_grad``
    (and ``autocast``), the student's with gradients, both heads, then ``criterion.linear`` (the release rule
    decides from its margins). No (N, C, V) tensor is built; the gradient reaches the student's backbone
    through its hidden states and its head weight (and bias) directly. ``times``, if given, receives
    ``"teacher"``: the seconds of the teacher's forward (CUDA-synchronised).
    """
    import contextlib
    import time

    ctx = autocast if autocast is not None else contextlib.nullcontext
    t0 = time.perf_counter()
    with torch.no_grad(), ctx():
        th = completion_hidden(teacher, rollouts)
        t_head = lm_head(teacher, th.dtype)
    if times is not None:
        if th.is_cuda:
            torch.cuda.synchronize(th.device)
        times["teacher"] = time.perf_counter() - t0
    sh = completion_hidden(student, rollouts)
    s_head = lm_head(student, sh.dtype)
    return criterion.linear(
        sh, s_head.weight, th, t_head.weight, rollouts.targets, segment_ids=rollouts.segment_ids,
        student_bias=s_head.bias, teacher_bias=t_head.bias, chunk_size=chunk_size,
        student_logit_scale=s_head.logit_scale, teacher_logit_scale=t_head.logit_scale,
        student_final_logit_softcapping=s_head.softcap, teacher_final_logit_softcapping=t_head.softcap,
    )
