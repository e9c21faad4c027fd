"""What the trainer hands the hidden-state loss (docs/formulas.md §6): final hidden states and LM heads.

- :func:`completion_hidden`: (N, C, H) final hidden states (after the final norm) at the positions whose
  logits predict the completion tokens, P-1 .. P+C-2 -- exactly what the LM head maps to the trainer's
  former ``completion_logits``. The model runs through its wrapper (DDP/FSDP hooks fire) with
  ``output_hidden_states=True`` and ``logits_to_keep=1``, so its own head projects one position per row: an
  (N, 1, V) tensor, never (N, C, V).
- the heads: :meth:`fastopd.LMHead.from_model` (output-embedding weight and bias, logit scale and final-logit
  soft-cap from the config), cast to the hidden states' dtype.

FSDP: the head weight outside the wrapped forward is a shard. Under FSDP2 it is a DTensor and
:meth:`fastopd.LMHead.from_model` gathers it with ``full_tensor()`` (differentiable: the gradient is
reduce-scattered back to the shard), once per step for all chunks. FSDP1 keeps flat parameters whose original
views are not usable outside the forward; the hidden-state loss is refused there (use FSDP2, or
``loss_from="logits"``).
"""

from __future__ import annotations

import torch

from fastopd.head import LMHead, unwrap_model as _unwrap
from fastopd.train.models import forward_accepts


def completion_hidden(model, rollouts) -> torch.Tensor:
    """(N, C, H) final hidden states whose head outputs predict the completion tokens (positions P-1 .. P+C-2).

    ``model(..., output_hidden_states=True).hidden_states[-1]`` is the last layer's output after the final
    norm (what the LM head reads) in Hugging Face decoder models; ``logits_to_keep=1`` keeps the model's
    own head to one position per row.
    """
    c = rollouts.targets.shape[1]
    kwargs = dict(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                  position_ids=rollouts.position_ids, use_cache=False, output_hidden_states=True)
    if not forward_accepts(model, "logits_to_keep"):
        raise ValueError(
            f"{type(_unwrap(model)).__name__}.forward has no logits_to_keep: it would build (N, P + C, V) logits; "
            "use loss_from='logits' for this model"
        )
    out = model(**kwargs, logits_to_keep=1)
    return out.hidden_states[-1][:, -(c + 1):-1]


def hidden_loss(criterion, student, teacher, rollouts, *, autocast=None, chunk_size: int | None = None,
                times: dict | None = None, weights: torch.Tensor | None = None, normalizer=None,
                teacher_hidden: torch.Tensor | None = None):
    """Steps 4-5 of a training step from hidden states: the teacher's final hidden states under ``no_grad``
    (and ``autocast``), the student's with gradients, both heads, then ``criterion.linear`` (the release rule
    decides from its margins). No (N, C, V) tensor is built; the gradient reaches the student's backbone
    through its hidden states and its head weight (and bias) directly. ``times``, if given, receives
    ``"teacher"``: the seconds of the teacher's forward (CUDA-synchronised). ``weights`` / ``normalizer``: for a
    criterion without a rule (sampler online: the weights were decided while sampling), passed to it as they are.
    ``teacher_hidden``: the teacher's (N, C, H) final hidden states at those positions, already computed (the online
    sampler's chunk scoring keeps them): the teacher is not run again, only its head is read.
    """
    import contextlib
    import time

    ctx = autocast if autocast is not None else contextlib.nullcontext
    t0 = time.perf_counter()
    with torch.no_grad(), ctx():
        if teacher_hidden is None:
            th = completion_hidden(teacher, rollouts)
        else:
            c = rollouts.targets.shape[1]
            if teacher_hidden.dim() != 3 or tuple(teacher_hidden.shape[:2]) != tuple(rollouts.targets.shape):
                raise ValueError(f"teacher_hidden must have shape (N, C, H) = {tuple(rollouts.targets.shape)} + (H,), "
                                 f"got {tuple(teacher_hidden.shape)}")
            th = teacher_hidden.to(rollouts.targets.device)[:, :c]
        t_head = LMHead.from_model(teacher, th.dtype)
    if times is not None:
        if th.is_cuda:
            torch.cuda.synchronize(th.device)
        times["teacher"] = time.perf_counter() - t0
    sh = completion_hidden(student, rollouts)
    s_head = LMHead.from_model(student, sh.dtype)
    if weights is not None or criterion.rule is None:
        return criterion.linear(sh, s_head, th, t_head, rollouts.targets, weights=weights, normalizer=normalizer,
                                chunk_size=chunk_size)
    return criterion.linear(sh, s_head, th, t_head, rollouts.targets, segment_ids=rollouts.segment_ids,
                            normalizer=normalizer, chunk_size=chunk_size)
