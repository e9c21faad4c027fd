"""The release rule: token stats -> segment means -> BIC scan -> weights (docs/formulas.md §2-4).

:func:`bic_release` runs the C++ scan (``fastopd._C``); :class:`ReleaseRule` is the one object that goes
from logits (or margins) and segment ids to per-token weights and diagnostics, for the rule itself and for
its controls (``full``, ``fixed_prefix``, ``random``, ``shuffled``).

Where each step runs: the segment means are the reference's NumPy bincount on CPU tensors and, on CUDA
tensors (backend ``auto``/``triton``), :func:`fastopd.kernels.segment_sums_triton`, so only the (B, S)
sums and counts cross to the host, not every margin; the scan is C++ on the host. The weights
(docs/formulas.md §4) are O(B L) masks, and the reference functions compute them on the tensors' own device:
they are reached through :func:`fastopd._dispatch.cpu_ops` (the CPU dispatch), not used as a test oracle.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fastopd._dispatch import cpu_ops, load_c, resolve_backend
from fastopd._validate import (
    check_fraction,
    check_num_threads,
    check_ragged,
    check_scan_options,
    check_seed,
    check_segment_ids,
    scan_int,
)
from fastopd.common import (
    MODES,
    release_fractions,
    release_means,
    release_segment_ids,
    release_sums,
    series_from_sums,
)
from fastopd.options import StatsOptions
from fastopd.stats import token_stats
from fastopd.types import ReleaseResult, SegmentMeans


# The segment means and the weights are the reference's functions (they run on the tensors' own device), looked
# up through the CPU dispatch at each call, not bound at import: fastopd._dispatch.cpu_ops stays the one entry.
def segment_means(values, segment_ids, valid) -> SegmentMeans:
    """Per-rollout segment means x_j of a per-token value (docs/formulas.md §2): :func:`fastopd.reference.segment_means`."""
    return cpu_ops().segment_means(values, segment_ids, valid)


def release_weights(segment_ids, valid_mask, release_segment) -> torch.Tensor:
    """Per-token weights of the rule (docs/formulas.md §4): :func:`fastopd.reference.release_weights`."""
    return cpu_ops().release_weights(segment_ids, valid_mask, release_segment)


def control_weights(kind: str, segment_ids, valid_mask, *, fraction: float = 0.5, generator=None,
                    kept_fractions=None) -> torch.Tensor:
    """The controls' per-token weights (docs/formulas.md §4): :func:`fastopd.reference.control_weights`."""
    return cpu_ops().control_weights(kind, segment_ids, valid_mask, fraction=fraction, generator=generator,
                                     kept_fractions=kept_fractions)


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
        :class:`fastopd.ReleaseResult` (release_index int64, gain float64, accepted bool).

    Raises:
        TypeError: values not a float array, offsets not an integer array.
        ValueError: offsets not non-decreasing or out of range, bad shapes, bad options.
    """
    load_c("bic_scan", "fastopd.reference.bic_release")
    check_scan_options(min_segments, min_gain)
    check_num_threads(num_threads)
    vals, offs = check_ragged(values, offsets)
    return ReleaseResult(*scan_checked(vals, offs, min_segments, min_gain, num_threads))


def scan_checked(vals: np.ndarray, offs: np.ndarray, min_segments: int, min_gain: float, num_threads: int = 0):
    """The C++ scan on arguments already checked (:func:`bic_release` checks a user's; :class:`fastopd.OnlineRelease`
    checks its options once and builds its own arrays, then calls this per pushed segment): ``(release_index,
    gain, accepted)`` arrays."""
    from fastopd import _C

    return _C.bic_scan(vals, offs, scan_int(min_segments, vals), float(min_gain), int(num_threads))


@dataclass
class ReleaseDecision:
    """What :class:`ReleaseRule` decided for a batch of B rollouts.

    Attributes:
        weights: float32 (B, L) per-token w_t (docs/formulas.md §4, or the control's).
        scan: the BIC scan's :class:`ReleaseResult` (``release_index`` r into each rollout's series).
        release_segment: int64 (B,) the first released segment id (segments below it are kept by the rule);
            for a rollout that is not accepted, one past its last segment
            (:func:`fastopd.common.release_segment_ids`).
        kept_fraction: float64 (B,) #(valid and w_t > 0) / #valid per rollout (NaN for a rollout with no
            valid token); in a control mode it is the control's, not the release point's.
        release_fraction: float64 (B,) the fraction of valid tokens before ``release_segment``
            (:func:`fastopd.common.release_fractions`); equal to ``kept_fraction`` in mode ``release``.
        series: the :class:`SegmentMeans` the scan ran on.
        totals: :func:`fastopd.common.release_sums` of this batch (a trainer adds these over micro-batches
            and processes, then calls :func:`fastopd.common.release_means`).
        metrics: ``release_means(totals)``: ``accept_rate``, ``gain_mean`` (over rollouts with a candidate),
            ``kept_fraction`` (tokens kept / valid tokens over the batch), ``release_position`` (mean
            ``release_fraction`` of the accepted rollouts, NaN if none).
    """

    weights: torch.Tensor
    scan: ReleaseResult
    release_segment: np.ndarray
    kept_fraction: np.ndarray
    release_fraction: np.ndarray
    series: SegmentMeans
    totals: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    elapsed_s: float = 0.0  # wall time of the decision (means + scan + weights), for the trainer's time_rule


class ReleaseRule:
    """The "Prefix Teach, Suffix Fade" release rule, or one of its controls, as one object.

    Args:
        mode: ``"release"`` (the rule), or a control: ``"full"``, ``"fixed_prefix"``, ``"random"``,
            ``"shuffled"`` (the rule's kept fractions of the batch permuted among its rollouts). The BIC
            scan runs in every mode, so the diagnostics are comparable; only the weights differ.
        k: student candidates for the margin m_t.
        temperature: tau of the margin.
        min_segments, min_gain: options of the scan (:func:`bic_release`).
        fraction: kept fraction for ``fixed_prefix``.
        seed: seed of the ``random`` and ``shuffled`` controls' generator (None or an int >= 0).
        backend: backend of :func:`fastopd.token_stats` when called on logits.
        options: a :class:`fastopd.StatsOptions` instead of k, temperature and backend (and, for
            :meth:`__call__`, the default ignore_index and vocab_size); ``self.options`` holds them either way.

    Every option is checked at construction (``ValueError``/``TypeError`` naming it): k an int >= 2,
    temperature a finite number > 0, min_segments an int >= 1, min_gain a number (not NaN; -inf accepts every
    candidate split), fraction in (0, 1], mode and backend from their sets. A bool is not a number.

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
        options: StatsOptions | None = None,
    ) -> None:
        # Every option is checked here, so a bad rule fails where it is built, not at its first batch.
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.options = StatsOptions.of(options, k=k, temperature=temperature, backend=backend)
        check_scan_options(min_segments, min_gain)
        check_fraction(fraction)
        check_seed(seed)
        self.mode = mode
        self.min_segments = int(min_segments)
        self.min_gain = float(min_gain)
        self.fraction = float(fraction)
        self._rng = np.random.default_rng(seed)

    @property
    def k(self) -> int:
        """``options.k``: the student's candidates of the margin."""
        return self.options.k

    @property
    def temperature(self) -> float:
        """``options.temperature``: tau of the margin."""
        return self.options.temperature

    @property
    def backend(self) -> str:
        """``options.backend``: the backend of the statistics and the segment sums."""
        return self.options.backend

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
        """Decide the weights of a (B, L) batch from its logits (computes :func:`fastopd.token_stats`).
        ``ignore_index`` and ``vocab_size`` at their defaults mean ``self.options``' values."""
        given = {name: value for name, value, default in
                 (("ignore_index", ignore_index, -100), ("vocab_size", vocab_size, None)) if value != default}
        opts = dataclasses.replace(self.options, **given) if given else self.options
        stats = token_stats(student_logits, teacher_logits, target_ids, options=opts)
        return self.from_margins(stats.margins, segment_ids, stats.valid)

    def from_margins(self, margins, segment_ids, valid) -> ReleaseDecision:
        """Decide the weights from per-token margins m_t (B, L), segment ids (B, L) and the valid mask.

        At valid positions the segment ids must lie in [0, L) and never decrease along a row (docs/formulas.md
        §2; ``fastopd.token_segments`` gives them so); invalid positions are not read (padding: -1).
        """
        t0 = time.perf_counter()
        seg = segment_ids if isinstance(segment_ids, torch.Tensor) else torch.as_tensor(np.asarray(segment_ids))
        valid = valid if isinstance(valid, torch.Tensor) else torch.as_tensor(np.asarray(valid))
        series = self.segment_series(margins, seg, valid)
        scan = bic_release(series.values, series.offsets, min_segments=self.min_segments, min_gain=self.min_gain)
        release_segment = release_segment_ids(series, scan)
        release_fraction = release_fractions(seg, valid, release_segment)  # the rule's L_kept / L per rollout
        if self.mode == "release":
            weights = release_weights(seg, valid, release_segment)
        elif self.mode == "shuffled":  # the rule's kept fractions, permuted among the batch's rollouts
            weights = control_weights("shuffled", seg, valid, generator=self._rng, kept_fractions=release_fraction)
        else:
            weights = control_weights(self.mode, seg, valid, fraction=self.fraction, generator=self._rng)
        return make_decision(weights, valid, scan, release_segment, release_fraction, series, t0)

    def segment_series(self, margins, segment_ids: torch.Tensor, valid: torch.Tensor) -> SegmentMeans:
        """The segment-mean series x_j (docs/formulas.md §2) of a (B, L) batch.

        On CUDA tensors (and on CPU tensors with ``backend="triton"`` under the Triton interpreter) the sums
        and counts come from :func:`fastopd.kernels.segment_sums_triton` (fp32 atomics: the last bits of a
        sum depend on the order of the adds), so only the (B, S) sums and counts cross to the host;
        otherwise the reference's float64 NumPy bincount.
        """
        if isinstance(margins, torch.Tensor) and margins.dim() == 2 and segment_ids.shape == margins.shape:
            dtypes = (margins.dtype,) if margins.dtype in (torch.float16, torch.bfloat16, torch.float32) else (None,)
            if resolve_backend(self.backend, margins.device, dtypes=dtypes) == "triton":
                from fastopd.kernels import segment_sums_triton

                check_segment_ids(segment_ids.to(margins.device), valid.to(margins.device))
                sums, counts = segment_sums_triton(margins, segment_ids.to(margins.device), valid.to(margins.device))
                return series_from_sums(sums.cpu().numpy(), counts.cpu().numpy())
        return segment_means(margins, segment_ids, valid)


def make_decision(weights, valid, scan, release_segment, release_fraction, series, t0: float) -> ReleaseDecision:
    """The :class:`ReleaseDecision` of per-token ``weights`` (kept fractions and the batch's diagnostics),
    timed from ``t0`` (``time.perf_counter()``); the offline rule and the online one (fastopd.train.online_sampler)."""
    valid_dev = valid.to(weights.device)
    n_valid = valid_dev.sum(-1).cpu().numpy().astype(np.float64)
    n_kept = ((weights > 0) & valid_dev).sum(-1).cpu().numpy().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        kept_fraction = n_kept / n_valid
    totals = release_sums(scan.gain, scan.accepted, release_fraction, n_valid.sum(), n_kept.sum())
    return ReleaseDecision(weights, scan, release_segment, kept_fraction, release_fraction, series, totals,
                           release_means(totals), elapsed_s=time.perf_counter() - t0)
