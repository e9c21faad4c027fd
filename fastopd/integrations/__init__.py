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

from fastopd.segment import completion_segments  # noqa: F401 -- re-exported for the adapters

METRIC_PREFIX = "opd/"  # every integration's metric names start with it
