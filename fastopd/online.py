"""Online release (docs/formulas.md §8): the release rule decided while a rollout is sampled, so that the
suffix it would release is never generated, scored or trained.

- :func:`online_release`: the batched replay of the online rule on logged ragged series (C++,
  ``fastopd._C.online_scan``; the oracle is :func:`fastopd.reference.online_release`). It measures, on any
  run's logged segment means, where the online rule would have stopped each rollout.
- :class:`OnlineRelease`: the same rule for one rollout inside a generation loop: :meth:`OnlineRelease.push`
  one finalised segment mean at a time; it returns True when the rollout must stop. Its decisions are the
  replay's (both run the scan of §3 on the same prefixes, bit for bit the reference's).

Segments are finalised as the text grows by :func:`fastopd.segment.segments_so_far`; the generation loop that
uses both (chunked sampling, the teacher scoring each chunk with its own KV cache) is
:mod:`fastopd.train.online`.
"""

from __future__ import annotations

import math

import numpy as np

from fastopd._dispatch import load_c
from fastopd._validate import (
    check_confirm_segments,
    check_num_threads,
    check_ragged,
    check_scan_options,
    is_real,
    scan_int,
)
from fastopd.release import bic_release
from fastopd.types import OnlineReleaseResult

__all__ = ["OnlineRelease", "online_release"]



def online_release(values, offsets, *, min_segments: int = 2, min_gain: float = 10.0, confirm_segments: int = 2,
                   num_threads: int = 0) -> OnlineReleaseResult:
    """The online release rule (docs/formulas.md §8) replayed on every rollout of a ragged batch, in C++.

    For each rollout's series x_0..x_{n-1} (its segment means, in order) the rule sees the first n' entries after
    segment n'-1 is finalised, runs the scan of §3 on them, and stops the rollout at the first n' where the scan
    is accepted with release index r and n' - r >= ``confirm_segments``. A rollout that never stops gets the scan
    of its whole series, so with ``confirm_segments`` larger than every series this is :func:`fastopd.bic_release`
    exactly. Bit for bit :func:`fastopd.reference.online_release`.

    Args:
        values: float64 1-D, the concatenated series (e.g. ``SegmentMeans.values`` or a run's logged series).
        offsets: int64 of length B+1; rollout b is ``values[offsets[b]:offsets[b+1]]``.
        min_segments: m, the fewest segments on each side of a split (default 2).
        min_gain: accept when the BIC gain exceeds this (default 10).
        confirm_segments: c >= m, the fewest segments from the release index to the stop (default 2): the rule
            stops only once it has seen c segments past the change point.
        num_threads: threads for large batches (0: OpenMP's default).

    Returns:
        :class:`fastopd.OnlineReleaseResult`: ``stop_index`` (n' or n), ``release_index``, ``gain``,
        ``accepted``, ``stopped``.

    Cost: each prefix that can stop (n' >= m + c) is scanned in O(n'), so O(n^2) per series at worst
    (docs/formulas.md §8 says why the replay stays exact instead of incremental); series are tens to hundreds of
    segments long.
    """
    _C = load_c("online_scan", "fastopd.reference.online_release")
    check_scan_options(min_segments, min_gain)
    check_confirm_segments(confirm_segments, min_segments)
    check_num_threads(num_threads)
    vals, offs = check_ragged(values, offsets)
    stop, release, gain, accepted, stopped = _C.online_scan(
        vals, offs, scan_int(min_segments, vals), float(min_gain), scan_int(confirm_segments, vals), int(num_threads))
    return OnlineReleaseResult(release, gain, accepted, stop, stopped)


class OnlineRelease:
    """The online release rule for one rollout, fed one finalised segment mean at a time (docs/formulas.md §8).

    Args:
        min_segments, min_gain, confirm_segments: as in :func:`online_release`.

    Use :meth:`push` after each finalised segment; when it returns True the rollout ends after that segment and
    ``release_index`` is the kept prefix (segments ``[0, release_index)`` of the series). When the rollout ends
    without a stop (EOS, length limit), push its remaining segments and call :meth:`finish`, which runs the
    offline scan of §3 on the whole series. The decisions equal :func:`online_release` on the pushed series.

    Cost: a push scans the prefix (O(n') in C++, plus a Python call), only once n' >= m + c.

    Example:
        >>> rule = fastopd.OnlineRelease(confirm_segments=2)
        >>> for x in segment_means_as_they_are_finalised:
        ...     if rule.push(x):
        ...         break  # stop generating this rollout
        >>> rule.finish().release_index
    """

    def __init__(self, *, min_segments: int = 2, min_gain: float = 10.0, confirm_segments: int = 2) -> None:
        check_scan_options(min_segments, min_gain)
        check_confirm_segments(confirm_segments, min_segments)
        self.min_segments = int(min_segments)
        self.min_gain = float(min_gain)
        self.confirm_segments = int(confirm_segments)
        self._values: list[float] = []
        self._decision: tuple[int, float, bool] | None = None  # (release, gain, accepted) once stopped/finished
        self._stopped = False
        self._finite = True

    def __repr__(self) -> str:
        return (f"OnlineRelease(min_segments={self.min_segments}, min_gain={self.min_gain}, "
                f"confirm_segments={self.confirm_segments}, n={len(self._values)}, stopped={self._stopped})")

    @property
    def values(self) -> np.ndarray:
        """The series pushed so far (float64)."""
        return np.asarray(self._values, dtype=np.float64)

    @property
    def n(self) -> int:
        """Segments pushed so far (n')."""
        return len(self._values)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, value) -> bool:
        """Add the mean of the next finalised segment; True if the rule stops the rollout after it.

        Raises ``RuntimeError`` after a stop or after :meth:`finish` (the rollout has ended).
        """
        if self._stopped or self._decision is not None:
            raise RuntimeError("OnlineRelease.push after the rollout ended (stopped or finished)")
        if not is_real(value):
            raise TypeError(f"value must be a real number (a segment mean), got {type(value).__name__}")
        self._values.append(float(value))
        self._finite = self._finite and math.isfinite(self._values[-1])
        n = len(self._values)
        if n - self.confirm_segments < self.min_segments:  # r >= m and n' - r >= c need n' >= m + c
            return False
        if not self._finite:
            return False  # the scan of a series with a non-finite entry is never accepted (§3): skip it
        release, gain, accepted = self._scan()
        if accepted and n - release >= self.confirm_segments:
            self._decision = (release, gain, accepted)
            self._stopped = True
            return True
        return False

    def _scan(self) -> tuple[int, float, bool]:
        res = bic_release(self.values, np.array([0, len(self._values)], dtype=np.int64),
                          min_segments=self.min_segments, min_gain=self.min_gain)
        return int(res.release_index[0]), float(res.gain[0]), bool(res.accepted[0])

    def finish(self) -> OnlineReleaseResult:
        """The rollout's decision, as a one-entry :class:`fastopd.OnlineReleaseResult`: the stop's, or (no stop)
        the scan of the whole series pushed. Later pushes are refused."""
        if self._decision is None:
            self._decision = self._scan()
        release, gain, accepted = self._decision
        return OnlineReleaseResult(
            np.array([release], dtype=np.int64), np.array([gain], dtype=np.float64), np.array([accepted], dtype=bool),
            np.array([len(self._values)], dtype=np.int64), np.array([self._stopped], dtype=bool))
