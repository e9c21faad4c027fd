"""The release rule: token stats -> segment means -> BIC scan -> weights (docs/formulas.md §2-4).

:func:`bic_release` runs the C++ scan (``fastopd._C``); :class:`ReleaseRule` is the one object that goes
from logits (or margins) and segment ids to per-token weights and diagnostics, for the rule itself and for
its controls (``full``, ``fixed_prefix``, ``random``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fastopd import reference
from fastopd._validate import check_ragged, check_scan_options
from fastopd.reference import control_weights, release_weights, segment_means
from fastopd.types import ReleaseResult, SegmentMeans

MODES = ("release",) + reference.CONTROLS

__all__ = [
    "MODES", "ReleaseDecision", "ReleaseRule", "bic_release", "control_weights", "release_weights", "segment_means",
]


def bic_release(values, offsets, *, min_segments: int = 2, min_gain: float = 10.0, num_threads: int = 0) -> ReleaseResult:
    """Profiled RSS-BIC release point of every rollout of a ragged batch (docs/formulas.md §3), in C++.

    O(total n) with prefix sums of the centred series, the GIL released, parallel over rollouts for large
    batches. Same signature and bit-for-bit the same results as :func:`fastopd.reference.bic_release`.

    Args:
        values: float64 1-D, the concatenated segment-mean series (e.g. ``SegmentMeans.values``).
        offsets: int64 of length B+1; rollout b is ``values[offsets[b]:offsets[b+1]]``.
        min_segments: m, the fewest segments on each side of the split (default 2).
        min_gain: accept when the BIC gain exceeds this (default 10, "very strong" evidence).
        num_threads: threads for large batches (0: OpenMP's default).

    Returns:
        :class:`fastopd.ReleaseResult` (release_segment int64, gain float64, accepted bool).

    Raises:
        TypeError: values not a float array, offsets not an integer array.
        ValueError: offsets not non-decreasing or out of range, bad shapes, bad options.
    """
    try:
        from fastopd import _C
    except ImportError as e:  # a source checkout that was never built
        raise ImportError(
            "fastopd's C++ extension fastopd._C is not built: run `pip install -e .` in the repository "
            "(fastopd.reference.bic_release is the pure-Python equivalent)"
        ) from e
    check_scan_options(min_segments, min_gain)
    vals, offs = check_ragged(values, offsets)
    release, gain, accepted = _C.bic_scan(vals, offs, int(min_segments), float(min_gain), int(num_threads))
    return ReleaseResult(release, gain, accepted)


@dataclass
class ReleaseDecision:
    """What :class:`ReleaseRule` decided for a batch of B rollouts.

    Attributes:
        weights: float32 (B, L) per-token w_t (docs/formulas.md §4, or the control's).
        scan: the BIC scan's :class:`ReleaseResult` (index r into each rollout's series).
        release_segment: int64 (B,) the first released segment id (segments below it are kept); for a
            rollout that is not accepted, one past its last segment.
        kept_fraction: float64 (B,) L_kept / L per rollout (NaN for a rollout with no valid token).
        series: the :class:`SegmentMeans` the scan ran on.
        metrics: plain floats: ``accept_rate``, ``gain_mean`` (over rollouts with a candidate),
            ``kept_fraction`` (tokens kept / valid tokens over the batch), ``release_position`` (mean
            kept fraction of the accepted rollouts, NaN if none).
    """

    weights: torch.Tensor
    scan: ReleaseResult
    release_segment: np.ndarray
    kept_fraction: np.ndarray
    series: SegmentMeans
    metrics: dict = field(default_factory=dict)


class ReleaseRule:
    """The "Prefix Teach, Suffix Fade" release rule, or one of its controls, as one object.

    Args:
        mode: ``"release"`` (the rule), or a control: ``"full"``, ``"fixed_prefix"``, ``"random"``. The BIC
            scan runs in every mode, so the diagnostics are comparable; only the weights differ.
        k: student candidates for the margin m_t.
        temperature: tau of the margin.
        min_segments, min_gain: options of the scan (:func:`bic_release`).
        fraction: kept fraction for ``fixed_prefix``.
        seed: seed of the ``random`` control's generator.
        backend: backend of :func:`fastopd.token_stats` when called on logits.

    Example:
        >>> rule = fastopd.ReleaseRule()
        >>> dec = rule(student_logits, teacher_logits, completion_ids, segment_ids)
        >>> dec.weights, dec.scan.accepted, dec.metrics["accept_rate"]
    """

    def __init__(
        self,
        mode: str = "release",
        *,
        k: int = 16,
        temperature: float = 1.0,
        min_segments: int = 2,
        min_gain: float = 10.0,
        fraction: float = 0.5,
        seed: int | None = None,
        backend: str = "auto",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_scan_options(min_segments, min_gain)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.mode = mode
        self.k = k
        self.temperature = temperature
        self.min_segments = min_segments
        self.min_gain = min_gain
        self.fraction = fraction
        self.backend = backend
        self._rng = np.random.default_rng(seed)

    @property
    def generator(self) -> np.random.Generator:
        """The numpy Generator of the ``random`` control (its state is what a checkpoint saves)."""
        return self._rng

    def __repr__(self) -> str:
        return (
            f"ReleaseRule(mode={self.mode!r}, k={self.k}, min_segments={self.min_segments}, "
            f"min_gain={self.min_gain}, fraction={self.fraction})"
        )

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target_ids: torch.Tensor,
        segment_ids,
        *,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ) -> ReleaseDecision:
        """Decide the weights of a (B, L) batch from its logits (computes :func:`fastopd.token_stats`)."""
        from fastopd.stats import token_stats

        stats = token_stats(
            student_logits, teacher_logits, target_ids,
            k=self.k, temperature=self.temperature, ignore_index=ignore_index, vocab_size=vocab_size,
            backend=self.backend,
        )
        return self.from_margins(stats.margins, segment_ids, stats.valid)

    def from_margins(self, margins, segment_ids, valid) -> ReleaseDecision:
        """Decide the weights from per-token margins m_t (B, L), segment ids (B, L) and the valid mask."""
        series = segment_means(margins, segment_ids, valid)
        scan = bic_release(series.values, series.offsets, min_segments=self.min_segments, min_gain=self.min_gain)
        release_segment = self._segment_ids_of(series, scan)
        seg = segment_ids if isinstance(segment_ids, torch.Tensor) else torch.as_tensor(np.asarray(segment_ids))
        valid = valid if isinstance(valid, torch.Tensor) else torch.as_tensor(np.asarray(valid))
        if self.mode == "release":
            weights = release_weights(seg, valid, release_segment)
        else:
            weights = control_weights(self.mode, seg, valid, fraction=self.fraction, generator=self._rng)
        n_valid = valid.sum(-1).cpu().numpy().astype(np.float64)
        n_kept = ((weights > 0) & valid.to(weights.device)).sum(-1).cpu().numpy().astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            kept_fraction = n_kept / n_valid
        has_candidate = np.isfinite(scan.gain)
        metrics = {
            "accept_rate": float(scan.accepted.mean()) if len(scan) else 0.0,
            "gain_mean": float(scan.gain[has_candidate].mean()) if has_candidate.any() else float("nan"),
            "kept_fraction_rule": float(n_kept.sum() / max(n_valid.sum(), 1.0)),
            "release_position": float(kept_fraction[scan.accepted].mean()) if scan.accepted.any() else float("nan"),
        }
        return ReleaseDecision(weights, scan, release_segment, kept_fraction, series, metrics)

    @staticmethod
    def _segment_ids_of(series: SegmentMeans, scan: ReleaseResult) -> np.ndarray:
        """Map each rollout's release index r (into its series) back to a segment id."""
        offs = series.offsets
        out = np.empty(len(scan), dtype=np.int64)
        for b in range(len(scan)):
            ids = series.segment_ids[offs[b]:offs[b + 1]]
            r = int(scan.release_segment[b])
            out[b] = ids[r] if r < len(ids) else (int(ids[-1]) + 1 if len(ids) else 0)
        return out
