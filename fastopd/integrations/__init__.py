"""Adapters that put fastopd's release rule into other trainers; thin, with no formula of their own.

- :mod:`fastopd.integrations.trl`   ``ReleaseDistillationTrainer`` / ``ReleaseDistillationConfig`` for TRL's
  ``DistillationTrainer`` (extra ``fastopd[trl]``), and a logits path for ``GKDTrainer``.
- :mod:`fastopd.integrations.verl`  the ``fastopd_release`` distillation loss for verl (extra ``fastopd[verl]``),
  with margins from the teacher server's top-k (:func:`fastopd.sparse_margins`).

Neither is imported by ``import fastopd``: each imports its trainer library itself, so fastopd's own
environment never needs TRL or verl (verl pins ``transformers < 5.11``). Guide: ``docs/integrations.md``.
Both log their metrics under one prefix, :data:`METRIC_PREFIX` (``opd/accept_rate``, ``opd/kept_fraction``, ...).
"""

from __future__ import annotations

import torch

from fastopd.segment import completion_segments  # noqa: F401 -- re-exported for the adapters

METRIC_PREFIX = "opd/"  # every integration's metric names start with it


@torch.no_grad()
def student_entropy_sum(hidden: torch.Tensor, head, valid: torch.Tensor, temperature: float = 1.0,
                        chunk_size: int | None = None) -> torch.Tensor:
    """Sum over the ``valid`` positions of the student's entropy H(softmax(z_t / temperature)) in nats, z_t the
    head's logits of ``hidden`` (..., H) (a :class:`fastopd.LMHead`: bias, logit scale and soft-cap applied),
    over all the head's ``out_features``: what TRL's ``DistillationTrainer`` logs as ``entropy``
    (``ChunkedDivergenceFunction``'s, divided by the valid tokens after a gather).

    No (N, V) tensor: the valid rows are projected ``chunk_size`` at a time (None: fastopd's hidden-state
    default, :func:`fastopd.linear.default_chunk_size`), in float32, without autograd. Costs one more
    (rows, H) x (H, V) product of the student's head per valid token. Returns a float32 scalar on
    ``hidden``'s device.
    """
    from fastopd.head import as_lm_head
    from fastopd.linear import default_chunk_size, head_logits

    head = as_lm_head(head, "head")
    if valid.shape != hidden.shape[:-1]:
        raise ValueError(f"valid must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(valid.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    v = head.out_features
    weight = head.weight[:v]
    bias = None if head.bias is None else head.bias[:v]
    rows = hidden.reshape(-1, hidden.shape[-1])[valid.reshape(-1).to(hidden.device) != 0]
    if chunk_size is None:
        chunk_size = default_chunk_size("reference", v, hidden.device, hidden.element_size())
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.shape[0], chunk_size):
        z = head_logits(rows[start:start + chunk_size].to(weight.dtype), weight, bias, head.logit_scale, head.softcap)
        log_p = torch.log_softmax(z.float().div_(temperature), dim=-1)
        total += -(log_p.exp() * log_p).sum()  # H_t = -sum_v p_v log p_v, summed over the chunk's rows
    return total
