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
:mod:`fastopd.train.online_sampler` (and :class:`OnlineRollout` below, one rollout's bookkeeping).
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
from fastopd.common import series_from_sums
from fastopd.release import scan_checked
from fastopd.segment import segments_so_far, sentence_break_ids
from fastopd.types import OnlineReleaseResult, SegmentMeans

__all__ = ["OnlineRelease", "OnlineRollout", "collect", "online_release"]



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
        load_c("bic_scan", "fastopd.reference.online_release")  # a clear error now, not at the first scan
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
        # bic_release's scan without re-checking, per pushed segment, options checked once in __init__ and arrays
        # built here (the rule's share of an online step, issue 23)
        vals = self.values
        release, gain, accepted = scan_checked(vals, np.array([0, vals.size], dtype=np.int64), self.min_segments,
                                               self.min_gain)
        return int(release[0]), float(gain[0]), bool(accepted[0])

    def finish(self) -> OnlineReleaseResult:
        """The rollout's decision, as a one-entry :class:`fastopd.OnlineReleaseResult`: the stop's, or (no stop)
        the scan of the whole series pushed. Later pushes are refused."""
        if self._decision is None:
            self._decision = self._scan()
        release, gain, accepted = self._decision
        return OnlineReleaseResult(
            np.array([release], dtype=np.int64), np.array([gain], dtype=np.float64), np.array([accepted], dtype=bool),
            np.array([len(self._values)], dtype=np.int64), np.array([self._stopped], dtype=bool))


class OnlineRollout:
    """One rollout's online release while it is sampled (docs/formulas.md §8), free of any model or framework.

    A generation loop feeds it, after each chunk, the chunk's tokens of this rollout with the teacher's scores
    (:meth:`add`: margins m_t, log-probs s_t and u_t), then calls :meth:`advance`, which segments the text so far
    (:func:`fastopd.segment.segments_so_far`), pushes every newly finalised segment's mean
    (:func:`fastopd.segment_means`) to its :class:`OnlineRelease`, and ends the rollout at a stop (its kept
    tokens: segments ``[0, stop_index)``) or when ``complete`` (EOS, the length limit: every token kept).
    :func:`collect` gathers a batch's decisions and series. Used by the trainer's sampler
    (:mod:`fastopd.train.online_sampler`) and the Hugging Face stopping criterion
    (:mod:`fastopd.integrations.hf_stopping`).
    """

    __slots__ = ("tokens", "margins", "s", "u", "rule", "pushed", "seg", "done", "kept", "stopped", "scored",
                 "open_break", "checked", "pushed_tokens", "segmentations", "final_spans")

    def __init__(self, *, min_segments: int = 2, min_gain: float = 10.0, confirm_segments: int = 2) -> None:
        self.tokens: list[int] = []
        self.margins: list[float] = []
        self.s: list[float] = []  # student log-probs s_t of the tokens (the sampling logits, loss temperature)
        self.u: list[float] = []  # teacher log-probs u_t
        self.rule = OnlineRelease(min_segments=min_segments, min_gain=min_gain, confirm_segments=confirm_segments)
        self.pushed = 0  # segments pushed to the rule
        self.pushed_tokens = 0  # the tokens of those segments
        self.seg = np.zeros(0, dtype=np.int64)  # segment id of every token at the last segmentation (all, once done)
        self.done = False
        self.kept = 0  # tokens kept once done
        self.stopped = False
        self.scored = 0  # teacher positions counted for this rollout by the caller (add's `scored`)
        self.open_break = False  # the last segmentation's SegmentsSoFar.open_break
        self.checked = 0  # tokens known: segmented, or looked up in the break table since
        self.segmentations = 0  # calls of segments_so_far (the rule's cost)
        self.final_spans = ()  # the character spans final at the last segmentation (Punkt reads only what follows)

    def add(self, ids, margins, student_logprobs, teacher_logprobs, *, scored: int) -> None:
        """Append a chunk's tokens of this rollout (1-D sequences of equal length) and count ``scored``
        teacher positions."""
        self.scored += int(scored)
        self.tokens.extend(ids)
        self.margins.extend(margins)
        self.s.extend(student_logprobs)
        self.u.extend(teacher_logprobs)

    def _unchanged(self, tokenizer) -> bool:
        """True when the tokens added since the last segmentation cannot finalise a segment: that segmentation
        left no open sentence break (:attr:`fastopd.segment.SegmentsSoFar.open_break`) and none of the new
        tokens holds a sentence-end character or newline (:func:`fastopd.segment.sentence_break_ids`)."""
        if self.open_break:
            return False
        breaks = sentence_break_ids(tokenizer)
        if breaks is None:
            return False
        new = np.asarray(self.tokens[self.checked:], dtype=np.int64)
        if new.size and bool(breaks[new[new < breaks.size]].any()):
            return False
        self.checked = len(self.tokens)
        return True

    def advance(self, tokenizer, *, complete: bool) -> bool:
        """Segment the text so far, push the newly final segments' means; end the rollout at a stop or when
        ``complete``. Returns :attr:`done`.

        Costs what changed: while the rollout is incomplete, its text is segmented again only when the tokens
        added since the last segmentation can finalise a segment (:meth:`_unchanged`; otherwise the final
        segments are provably the same, so the decisions are those of segmenting every time, bit for bit), and
        then Punkt reads only the text after the final spans (:func:`fastopd.segment.resume_spans`);
        each finalised segment's mean is computed once, from its own tokens (the same sums as over the whole
        prefix: :func:`fastopd.segment_means`' bincount adds each segment's tokens in order); the rule scans only
        when a segment was pushed.
        """
        if not complete and self._unchanged(tokenizer):
            return self.done
        so_far = segments_so_far(tokenizer, np.asarray(self.tokens, dtype=np.int64), complete=complete,
                                 final_spans=self.final_spans)
        self.segmentations += 1
        self.final_spans = so_far.final_spans
        self.seg = so_far.segment_ids
        self.open_break = so_far.open_break
        self.checked = len(self.tokens)
        ft = so_far.final_tokens
        if so_far.final_segments > self.pushed:
            a = self.pushed_tokens  # the first token of segment `pushed`
            # fastopd.reference.segment_means' float64 bincount sums and series_from_sums on the new segments' tokens
            # (the same additions in the same order as over the whole prefix), without its argument checks
            ids = self.seg[a:ft] - self.pushed
            vals = np.asarray(self.margins[a:ft], dtype=np.float32).astype(np.float64)
            means = series_from_sums(np.bincount(ids, weights=vals)[None], np.bincount(ids)[None]).values
            first = self.pushed
            self.pushed_tokens = ft
            for j in range(first, so_far.final_segments):
                self.pushed = j + 1
                if self.rule.push(float(means[j - first])):
                    self.stopped = self.done = True
                    self.kept = int(np.searchsorted(self.seg, j + 1, side="left"))  # the tokens of segments [0, j]
                    return True
        if complete:
            self.done = True
            self.kept = len(self.tokens)
        return self.done


def collect(rollouts) -> tuple[OnlineReleaseResult, SegmentMeans]:
    """The finished :class:`OnlineRollout` s' decisions (one :class:`fastopd.OnlineReleaseResult`) and the series
    their rules read (:class:`fastopd.SegmentMeans`, exactly replayable by :func:`online_release`)."""
    fins = [r.rule.finish() for r in rollouts]
    names = ("release_index", "gain", "accepted", "stop_index", "stopped")
    empty = {"release_index": np.int64, "gain": np.float64, "accepted": bool, "stop_index": np.int64, "stopped": bool}
    decision = OnlineReleaseResult(*(np.concatenate([getattr(f, name) for f in fins]) if fins
                                     else np.zeros(0, dtype=empty[name]) for name in names))
    values = np.concatenate([r.rule.values for r in rollouts] + [np.zeros(0)]).astype(np.float64)
    offsets = np.concatenate([[0], np.cumsum([r.rule.n for r in rollouts])]).astype(np.int64)
    ids = np.concatenate([np.arange(r.rule.n) for r in rollouts] + [np.zeros(0)]).astype(np.int64)
    return decision, SegmentMeans(values, offsets, ids)
