"""The online release rule as a Hugging Face ``StoppingCriteria`` for a user's own ``generate`` call
(docs/formulas.md §8): :class:`OnlineReleaseStopping` returns a per-sequence stop.

The per-rollout bookkeeping is :class:`fastopd.OnlineRollout`; the teacher scores each chunk with
:class:`fastopd.train.chunk_scorer.ChunkScorer`, as in the trainer's online sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import StoppingCriteria

from fastopd.online import OnlineRollout, collect
from fastopd.train.chunk_scorer import ChunkScorer
from fastopd.types import OnlineReleaseResult, SegmentMeans

__all__ = ["OnlineGenerateResult", "OnlineReleaseStopping"]


class _RecordLogits:
    """A ``LogitsProcessor`` that keeps a copy of the logits it is given (the student's, before the sampling
    warpers) and returns them unchanged."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.rows.append(scores.detach().to(dtype=torch.float32, copy=True))
        return scores



class OnlineReleaseStopping(StoppingCriteria):
    """The online release rule (docs/formulas.md §8) as a ``transformers.StoppingCriteria`` for a user's own
    ``generate`` call: it returns a bool per sequence, True once the rule stops that sequence.

    Pass both the criterion and its ``logits_processor`` (it records the logits the student samples from:
    ``generate`` runs user processors after its own non-sampling ones -- none with default settings -- and
    before the temperature / top-k / top-p warpers)::

        stop = OnlineReleaseStopping(teacher, tokenizer, enc["attention_mask"], confirm_segments=2)
        out = student.generate(**enc, do_sample=True, max_new_tokens=512, logits_processor=[stop.logits_processor],
                               stopping_criteria=[stop])
        res = stop.result()               # per sequence: kept tokens, stop / release index, gain, series
        kept = [seq[p:p + n] for seq, n in zip(out, res.kept_lengths)]   # p = prompt width

    Every ``chunk_size`` tokens it runs the teacher on the new tokens with its own KV cache, takes the margins
    from the recorded student logits (:func:`fastopd.token_stats`), segments each sequence's text so far
    (:func:`fastopd.segment.segments_so_far`) and feeds the newly finalised segments' means to the sequence's
    :class:`fastopd.OnlineRelease`. :meth:`result` scores the last partial chunk and closes every sequence (a
    sequence that did not stop gets the offline decision on its whole series).

    Cost: one teacher forward per chunk over the whole batch (generate keeps every row, finished or stopped,
    so the teacher also reads their pad tokens), one (B, V) float32 logits copy per step held until the chunk is
    scored, a Punkt segmentation of each running sequence per chunk, and a scan per new segment. Generation
    itself ends only when every sequence has stopped or ended (generate does not shrink its batch): the
    stopped sequences are then fed pad tokens (if ``eos_token_id`` is set) and their tokens after the kept
    length must be dropped. The trainer's own sampler (:func:`fastopd.train.online_sampler.sample_online`) drops ended rows from both KV
    caches instead.

    Args:
        teacher: the teacher (a causal LM on the student's device, eval mode).
        tokenizer: the tokenizer of both (segmentation).
        attention_mask: (B, P) the prompts' attention mask given to ``generate`` (left padding).
        eos_ids: ids that end a sequence (default: the tokenizer's EOS).
        chunk_size, min_segments, min_gain, confirm_segments: as in
            :func:`fastopd.train.online_sampler.sample_online`.
        stats: the margin's options, a :class:`fastopd.StatsOptions` (k, the loss temperature tau, vocab_size,
            backend; default ``StatsOptions()``).
    """

    def __init__(self, teacher, tokenizer, attention_mask: torch.Tensor, *, eos_ids: list[int] | None = None,
                 chunk_size: int = 16, stats=None, min_segments: int = 2, min_gain: float = 10.0,
                 confirm_segments: int = 2):
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be the (B, P) attention mask of the prompts given to generate")
        eos_ids = [tokenizer.eos_token_id] if eos_ids is None else list(eos_ids)
        self.tokenizer = tokenizer
        self.pmask = attention_mask
        self.chunk_size = chunk_size
        self.logits_processor = _RecordLogits()
        self.rows = [OnlineRollout(min_segments=min_segments, min_gain=min_gain, confirm_segments=confirm_segments)
                     for _ in range(attention_mask.shape[0])]
        self.eos_ids = eos_ids
        self.scorer = ChunkScorer(teacher, torch.tensor(eos_ids, device=attention_mask.device), stats=stats)
        self.prompt_width = None
        self.first_pos = None
        self.scored = 0  # completion tokens scored so far (the same for every row)
        self.ended = torch.zeros(attention_mask.shape[0], dtype=torch.bool, device=attention_mask.device)
        self.stop = torch.zeros_like(self.ended)
        self._result = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.BoolTensor:
        if self._result is not None:
            raise RuntimeError("OnlineReleaseStopping is used by one generate call; build a new one for the next")
        if self.prompt_width is None:  # the first call: input_ids = prompt + one token
            self.prompt_width = input_ids.shape[1] - 1
            if self.pmask.shape != (input_ids.shape[0], self.prompt_width):
                raise ValueError(f"attention_mask has shape {tuple(self.pmask.shape)}, but generate's prompts are "
                                 f"{(input_ids.shape[0], self.prompt_width)}")
            pos = (self.pmask.long().cumsum(-1) - 1).masked_fill(self.pmask == 0, 0)
            self.first_pos = pos[:, -1] + 1
            self.scorer.prefill(input_ids[:, :-1], self.pmask, pos)
        if len(self.logits_processor.rows) != input_ids.shape[1] - self.prompt_width - self.scored:
            raise RuntimeError("OnlineReleaseStopping.logits_processor must be passed to the same generate call "
                               "(logits_processor=[stop.logits_processor]): it records the logits the student "
                               "samples from")
        if len(self.logits_processor.rows) >= self.chunk_size:
            self._score(input_ids, complete=False)
        return self.stop.clone()

    def _score(self, input_ids: torch.Tensor, complete: bool) -> None:
        rows_logits = self.logits_processor.rows
        length = len(rows_logits)
        if length == 0:
            return
        steps = self.scored + length
        ids = input_ids[:, self.prompt_width + self.scored:self.prompt_width + steps]
        alive = ~(self.ended | self.stop)
        c_ids, c_valid, c_m, c_s, c_u = self.scorer.score(ids, torch.stack(rows_logits, dim=1), alive, self.pmask,
                                                          self.first_pos, steps)
        self.logits_processor.rows = []
        self.scored = steps
        ended = torch.isin(ids, self.scorer.eos).any(1)
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            got = c_valid[i]
            row.add(c_ids[i][got].tolist(), c_m[i][got].tolist(), c_s[i][got].tolist(), c_u[i][got].tolist(),
                    scored=length)
            row.advance(self.tokenizer, complete=complete or bool(ended[i]))
            if row.stopped:
                self.stop[i] = True
            self.ended[i] = self.ended[i] | ended[i]

    def result(self, sequences: torch.Tensor | None = None) -> "OnlineGenerateResult":
        """Score the last partial chunk (``sequences``: generate's output, needed if tokens are left unscored) and
        close every sequence; the per-sequence outcome."""
        if self._result is None:
            if self.logits_processor.rows:
                if sequences is None:
                    raise ValueError("result(sequences) needs generate's output to score the last tokens")
                self._score(sequences, complete=True)
            for row in self.rows:
                if not row.done:
                    row.advance(self.tokenizer, complete=True)
            decision, series = collect(self.rows)
            self._result = OnlineGenerateResult(
                decision, series, np.array([r.kept for r in self.rows], dtype=np.int64),
                [np.asarray(r.seg[:r.kept]) for r in self.rows], [np.asarray(r.margins[:r.kept]) for r in self.rows])
        return self._result


@dataclass
class OnlineGenerateResult:
    """What :meth:`OnlineReleaseStopping.result` returns, per sequence.

    Attributes:
        decision: :class:`fastopd.OnlineReleaseResult` (stop_index, release_index, gain, accepted, stopped).
        series: the segment means the rule read (replayable by :func:`fastopd.online_release`).
        kept_lengths: int64 (B,) completion tokens to keep (a stopped sequence: its segments [0, stop_index);
            the tokens generate produced after them are to be dropped).
        segment_ids, margins: per sequence, the kept tokens' segment ids and margins m_t.
    """

    decision: OnlineReleaseResult
    series: SegmentMeans
    kept_lengths: np.ndarray
    segment_ids: list
    margins: list
