"""Result containers shared by every backend (docs/formulas.md defines the quantities they hold)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch


@dataclass
class TokenStats:
    """Per-token statistics of docs/formulas.md §1, each float32 of ``target_ids.shape``.

    Positions with ``valid == False`` (``target_ids == ignore_index``) hold 0 in every field.

    Attributes:
        student_logprobs: s_t = log p_S(y_t).
        teacher_logprobs: u_t = log p_T(y_t).
        advantages: A_t = u_t - s_t, the reverse-KL advantage.
        margins: m_t, the teacher's top-1 minus top-2 logit gap over the student's top-K candidates,
            divided by the temperature.
        valid: bool mask, ``target_ids != ignore_index``.
        reverse_kl: KL_t = sum_v p_S(v) (log p_S(v) - log p_T(v)); only when ``full_kl=True``.
        forward_kl: KL(p_T || p_S)_t = sum_v p_T(v) (log p_T(v) - log p_S(v)); only from a loss with
            ``loss="forward_kl"``.
        topk_ids: int64 (..., K) ids of the student's top-K candidates, ties to the lower index; only when
            ``return_topk=True`` (rows of invalid positions are -1, the padding id of :func:`fastopd.sparse_margins`).
    """

    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    advantages: torch.Tensor
    margins: torch.Tensor
    valid: torch.Tensor
    reverse_kl: torch.Tensor | None = None
    forward_kl: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None


@dataclass
class ReleaseResult:
    """Outcome of the profiled RSS-BIC scan (docs/formulas.md §3), one entry per rollout.

    Attributes:
        release_index: int64; r = tau* when accepted, else n (the series length): entries ``< r`` of the
            rollout's series are kept. It indexes the series, not segment ids (a segment with no valid token
            has no entry); :func:`fastopd.common.release_segment_ids` maps it to a segment id.
        gain: float64; BIC0 - BIC1(tau*); -inf when there is no candidate split, NaN for a non-finite series.
        accepted: bool; a candidate exists and ``gain > min_gain``.
    """

    release_index: np.ndarray
    gain: np.ndarray
    accepted: np.ndarray

    def __len__(self) -> int:
        return len(self.release_index)



@dataclass
class OnlineReleaseResult(ReleaseResult):
    """Outcome of the online release rule (docs/formulas.md §8) replayed on logged series, one entry per rollout.

    A :class:`ReleaseResult` (so :func:`fastopd.common.release_segment_ids` takes it) plus where the rollout
    stopped. For a rollout that stopped, ``release_index``, ``gain`` and ``accepted`` are the scan of its series'
    first ``stop_index`` entries (``accepted`` is then True); for one that did not, the scan of its whole series,
    exactly :func:`fastopd.bic_release`'s.

    Attributes:
        stop_index: int64; n' = the number of segments consumed when the rule stopped the rollout (it ends after
            entry ``stop_index - 1``); n, the series length, if it did not stop.
        stopped: bool; the rule stopped the rollout (``stop_index - release_index >= confirm_segments``).
    """

    stop_index: np.ndarray
    stopped: np.ndarray


class SegmentMeans(NamedTuple):
    """Ragged per-rollout series of segment means, ready for :func:`fastopd.bic_release`.

    Attributes:
        values: float64 1-D, the concatenated series x_j of every rollout (docs/formulas.md §2).
        offsets: int64 of length B+1; rollout b's series is ``values[offsets[b]:offsets[b+1]]``.
        segment_ids: int64 1-D aligned with ``values``: the segment id each entry is the mean of. Segments
            with no valid token are left out of the series, so entry j need not be segment j; use this to
            map a release index back to a segment id.
    """

    values: np.ndarray
    offsets: np.ndarray
    segment_ids: np.ndarray


@dataclass
class OPDOutput:
    """What :func:`fastopd.opd_loss` returns.

    Attributes:
        loss: scalar, sum_t l_t / normaliser (docs/formulas.md §5); differentiable w.r.t. the student logits.
        per_token: float32 l_t of ``target_ids.shape`` (0 at invalid positions), differentiable too.
        stats: the :class:`TokenStats` the loss was computed from (detached).
        metrics: plain-float diagnostics: ``adv_mean``, ``margin_mean``, ``kept_fraction``, ``num_valid``,
            ``num_kept``, ``loss`` and, for ``loss="reverse_kl"`` / ``"forward_kl"``, ``reverse_kl_mean`` / ``forward_kl_mean`` (plus the rule's
            ``accept_rate``, ``gain_mean``, ``release_position`` when :class:`fastopd.OPDLoss` holds a rule).
        release: the :class:`fastopd.ReleaseDecision` when :class:`fastopd.OPDLoss` holds a rule, else None.
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    stats: TokenStats
    metrics: dict[str, Any] = field(default_factory=dict)
    release: Any = None
