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

import numpy as np
import torch

METRIC_PREFIX = "opd/"  # every integration's metric names start with it


def completion_segments(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sentence segment id of every completion token (docs/formulas.md §2), -1 after the last masked-in token.

    Each row is decoded up to and including its last position with ``completion_mask != 0`` (so tokens that a
    mask leaves out inside the completion, e.g. tool output, still give the text its context); positions
    after it get -1. Returns int64 (B, L) on ``completion_ids``' device.
    """
    from fastopd.segment import batch_token_segments

    if completion_ids.dim() != 2 or completion_mask.shape != completion_ids.shape:
        raise ValueError(
            "completion_ids and completion_mask must share one (B, L) shape, got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    mask = (completion_mask != 0).cpu()
    width = mask.shape[1]
    pos = torch.arange(1, width + 1).expand_as(mask)
    lengths = torch.where(mask, pos, torch.zeros_like(pos)).amax(-1) if width else torch.zeros(mask.shape[0], dtype=torch.long)
    seg = batch_token_segments(tokenizer, completion_ids.cpu(), valid_lengths=lengths.tolist(), pad_value=-1)
    return torch.from_numpy(np.asarray(seg, dtype=np.int64)).to(completion_ids.device)
