"""Online release in the trainer (docs/formulas.md §8): rollouts that stop where the rule releases them.

``mode: online`` replaces step 2 of a training step (``generate_completions``) with :func:`sample_online`, and
step 5's decision with the one made while sampling (:func:`online_loss`):

1. the student samples the rollouts in chunks of ``chunk_size`` tokens with its own KV cache, exactly as HF
   ``generate`` samples (the same forwards, temperature / top-k / top-p warpers, ``torch.multinomial``);
2. after each chunk the teacher scores the chunk's tokens with its own KV cache, and
   :func:`fastopd.token_stats` gives each token's margin m_t from the teacher's logits and the student's
   logits that the token was sampled from (its top-K candidates) -- the one implementation of §1;
3. each rollout's text is segmented so far (:func:`fastopd.segment.segments_so_far`); every newly finalised
   segment's mean (:func:`fastopd.segment_means`) goes to the rollout's :class:`fastopd.OnlineRelease`, and a
   rollout whose rule stops ends there: it is cut after the stopping segment (no EOS) and leaves the batch
   (both KV caches drop its row), so neither model reads its suffix;
4. the loss covers each rollout's kept prefix, segments [0, r), with §4's weights over the tokens of its
   segments [0, n'): only the kept prefix goes through the training forward (the weights are known before
   it), with the loss normaliser of the whole rollouts, so the loss equals the release rule's on the
   generated rollouts.

A rollout that ends (EOS, ``max_new_tokens``) without a stop gets the offline decision on its whole series: the
trainer's ``release`` mode on the same margins (tested).

For a user's own Hugging Face ``generate`` loop, :class:`OnlineReleaseStopping` is a
``transformers.StoppingCriteria`` (with a companion logits processor that records the logits the student
samples from) that returns a per-sequence stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fastopd.common import release_fractions, release_segment_ids
from fastopd.online import OnlineRelease
from fastopd.release import ReleaseDecision, make_decision, release_weights, segment_means
from fastopd.train.rollouts import IGNORE_INDEX, Rollouts, encode_prompts
from fastopd.types import OnlineReleaseResult, SegmentMeans

__all__ = ["OnlineDecisions", "OnlineGenerateResult", "OnlineReleaseStopping", "kept_rollouts", "online_loss",  # noqa: F822
           "online_rollouts", "online_weights", "sample_online", "sampling_warpers"]


# ----------------------------------------------------------------------------------------------------------
# Sampling exactly as HF generate does
# ----------------------------------------------------------------------------------------------------------

# Generation-config settings that make HF generate add a logits processor which sample_online does not apply
# (it applies temperature, top-k and top-p, as the trainer asks generate for): each with its inactive test.
_NOT_EMULATED = {
    "min_p": lambda v: v is None,
    "typical_p": lambda v: v is None or v >= 1.0,
    "epsilon_cutoff": lambda v: not v,
    "eta_cutoff": lambda v: not v,
    "top_h": lambda v: v is None,
    "no_repeat_ngram_size": lambda v: not v,
    "encoder_repetition_penalty": lambda v: v is None or v == 1.0,
    "bad_words_ids": lambda v: not v,
    "suppress_tokens": lambda v: not v,
    "begin_suppress_tokens": lambda v: not v,
    "sequence_bias": lambda v: not v,
    "min_length": lambda v: not v,
    "min_new_tokens": lambda v: not v,
    "forced_bos_token_id": lambda v: v is None,
    "forced_eos_token_id": lambda v: v is None,
    "exponential_decay_length_penalty": lambda v: v is None,
    "guidance_scale": lambda v: v is None or v == 1.0,
    "renormalize_logits": lambda v: not v,
    "remove_invalid_values": lambda v: not v,
    "watermarking_config": lambda v: v is None,
}


def check_generation_config(model) -> None:
    """Refuse a student whose generation config would make HF ``generate`` sample differently from
    :func:`sample_online` (a processor it does not emulate), naming the setting."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    for name, inactive in _NOT_EMULATED.items():
        value = getattr(gc, name, None)
        if not inactive(value):
            raise ValueError(
                f"mode online samples with temperature, top_k and top_p only, but the student's generation_config "
                f"sets {name}={value!r}, which HF generate would apply to the other modes' rollouts; unset it "
                "(model.generation_config) so that every mode samples from the same policy"
            )


def sampling_warpers(temperature: float, top_k: int, top_p: float):
    """HF's sampling warpers, in the order ``generate`` applies them: temperature (if != 1), top-k (if > 0),
    top-p (if < 1), each with ``min_tokens_to_keep=1`` (single-beam sampling)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def _forward_kwargs(model):
    """The model's name for the KV cache argument (``cache`` in transformers 5, ``past_key_values`` before) and
    whether it takes ``logits_to_keep``."""
    import inspect

    base = model
    while hasattr(base, "module"):
        base = base.module
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), ("logits_to_keep" in params)


class _Cached:
    """One model with its KV cache over a (shrinking) batch: prefill, then forwards of new tokens."""

    def __init__(self, model):
        self.model = model
        self.cache_arg, self.keep_arg = _forward_kwargs(model)
        self.cache = None

    def __call__(self, ids, mask, pos, *, last_only: bool):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True,
                  self.cache_arg: self.cache}
        if last_only and self.keep_arg:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        return out.logits[:, -1:] if last_only else out.logits

    def can_select(self) -> bool:
        return hasattr(self.cache, "batch_select_indices")

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch in the cache."""
        self.cache.batch_select_indices(rows)


class _ChunkScorer:
    """The teacher with its KV cache, scoring each chunk of sampled tokens: the margins, log-probs and valid mask
    of the chunk (:func:`fastopd.token_stats` on the student's sampling logits and the teacher's)."""

    def __init__(self, teacher, eos: torch.Tensor, *, k: int, temperature: float, vocab_size, backend: str):
        self.model = _Cached(teacher)
        self.eos, self.k, self.temperature, self.vocab_size, self.backend = eos, k, temperature, vocab_size, backend
        self.last = None  # the teacher's logits that predict the next chunk's first token
        self.seconds = 0.0

    def prefill(self, prompt_ids, pmask, pos) -> None:
        self.last = self.model(prompt_ids, pmask, pos, last_only=True)[:, -1]

    def score(self, ids: torch.Tensor, student_logits: torch.Tensor, alive: torch.Tensor, pmask: torch.Tensor,
              first_pos: torch.Tensor, steps: int):
        """Chunk ``ids`` (B, L) = completion tokens steps-L .. steps-1, sampled from ``student_logits`` (B, L, V);
        ``alive``: rows still sampling at the chunk's start. Returns numpy (ids, valid, m, s, u), each (B, L)."""
        from fastopd.stats import token_stats

        device = ids.device
        length = ids.shape[1]
        t0 = time.perf_counter()
        mask = torch.cat([pmask, pmask.new_ones((pmask.shape[0], steps))], dim=-1)
        pos = first_pos[:, None] + (steps - length) + torch.arange(length, device=device)[None]
        logits = self.model(ids, mask, pos, last_only=False)
        teacher_rows = torch.cat([self.last[:, None], logits[:, :-1]], dim=1)
        self.last = logits[:, -1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - t0
        # the chunk positions that are tokens of their rollout: up to and including its first EOS
        is_eos = torch.isin(ids, self.eos).long()
        valid = ((is_eos.cumsum(1) - is_eos) == 0) & alive.bool()[:, None]
        stats = token_stats(student_logits, teacher_rows, ids.masked_fill(~valid, IGNORE_INDEX), k=self.k,
                            temperature=self.temperature, vocab_size=self.vocab_size, backend=self.backend)
        return (ids.cpu().numpy(), valid.cpu().numpy(), stats.margins.float().cpu().numpy(),
                stats.student_logprobs.float().cpu().numpy(), stats.teacher_logprobs.float().cpu().numpy())


def _take(row, i: int, chunk, length: int) -> None:
    """Append batch row i of a scored chunk to ``row``."""
    ids, valid, m, s, u = chunk
    got = valid[i]
    row.scored += length
    row.tokens.extend(ids[i][got].tolist())
    row.margins.extend(m[i][got].tolist())
    row.s.extend(s[i][got].tolist())
    row.u.extend(u[i][got].tolist())


# ----------------------------------------------------------------------------------------------------------
# What the online sampler decided
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OnlineDecisions:
    """The online rule's per-rollout outcome, attached to the :class:`~fastopd.train.rollouts.Rollouts` it sampled.

    Attributes:
        decision: :class:`fastopd.OnlineReleaseResult`: ``stop_index`` n' (the rollout ends after segment n'-1;
            n if it did not stop), ``release_index`` r, ``gain``, ``accepted``, ``stopped``.
        series: the segment means the rule read (:class:`fastopd.SegmentMeans`; each rollout's n' or n entries),
            exactly replayable by :func:`fastopd.online_release`.
        margins, student_logprobs, teacher_logprobs: float32 (N, C) m_t, s_t, u_t of every kept token (0
            elsewhere) from the sampling logits and the teacher's chunk scoring, at the loss temperature.
        generated: int64 (N,) tokens the student sampled for each rollout (EOS included; after a stop, the rest of
            the chunk too, which is cut).
        teacher_scored: int64 (N,) token positions the teacher scored for each rollout while sampling.
        decode_rows: rows x decode steps of the student's sampling forwards (the batch shrinks as rollouts end).
        time_teacher: seconds of the teacher's chunk scoring (CUDA-synchronised).
        time_rule: seconds of the segmentation so far, the segment means and the rule's scans while sampling.
    """

    decision: OnlineReleaseResult
    series: SegmentMeans
    margins: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    generated: np.ndarray
    teacher_scored: np.ndarray
    decode_rows: int = 0
    time_teacher: float = 0.0
    time_rule: float = 0.0

    def record(self, b: int) -> dict:
        """Rollout b's online fields for ``rollouts.jsonl``."""
        d = self.decision
        return {"online_stopped": bool(d.stopped[b]), "stop_index": int(d.stop_index[b]),
                "release_index": int(d.release_index[b]), "tokens_generated": int(self.generated[b])}


class _Row:
    """One rollout's state while it is sampled."""

    __slots__ = ("tokens", "margins", "s", "u", "rule", "pushed", "seg", "done", "kept", "stopped", "scored")

    def __init__(self, rule: OnlineRelease):
        self.tokens: list[int] = []
        self.margins: list[float] = []
        self.s: list[float] = []
        self.u: list[float] = []
        self.rule = rule
        self.pushed = 0  # segments pushed to the rule
        self.seg = np.zeros(0, dtype=np.int64)
        self.done = False
        self.kept = 0
        self.stopped = False
        self.scored = 0


def _advance(row: _Row, tokenizer, complete: bool) -> None:
    """Segment the row's text so far, push its newly final segments' means; end it at a stop or when complete."""
    from fastopd.segment import segments_so_far

    so_far = segments_so_far(tokenizer, np.asarray(row.tokens, dtype=np.int64), complete=complete)
    row.seg = so_far.segment_ids
    ft = so_far.final_tokens
    if so_far.final_segments > row.pushed:
        m = np.asarray(row.margins[:ft], dtype=np.float32)[None]
        means = segment_means(m, row.seg[None, :ft], np.ones((1, ft), dtype=bool)).values
        for j in range(row.pushed, so_far.final_segments):
            row.pushed = j + 1
            if row.rule.push(float(means[j])):
                row.stopped = row.done = True
                row.kept = int(np.searchsorted(row.seg, j + 1, side="left"))  # the tokens of segments [0, j]
                return
    if complete:
        row.done = True
        row.kept = len(row.tokens)


@torch.no_grad()
def sample_online(student, teacher, tokenizer, prompts: list[str], *, eos_ids: list[int], max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, chunk_size: int = 16, k: int = 16,
                  loss_temperature: float = 1.0, vocab_size: int | None = None, min_segments: int = 2,
                  min_gain: float = 10.0, confirm_segments: int = 2, chat_template: bool = False,
                  max_prompt_tokens: int = 512, compact: bool = True, backend: str = "auto") -> Rollouts:
    """Sample the prompts' rollouts with the online release rule (module docstring, docs/formulas.md §8).

    Args:
        student, teacher: plain (unwrapped) causal LMs in eval mode, on one device.
        tokenizer, prompts, eos_ids, max_new_tokens, temperature, top_p, top_k, chat_template,
            max_prompt_tokens: as :func:`fastopd.train.rollouts.generate_completions` (sampling).
        chunk_size: tokens sampled between two scorings by the teacher (and two looks at the segments).
        k, loss_temperature, vocab_size, backend: the margin's options (:func:`fastopd.token_stats`).
        min_segments, min_gain, confirm_segments: the rule's (:class:`fastopd.OnlineRelease`).
        compact: drop ended rollouts from both models' batches (their KV-cache rows); False keeps them, fed the
            pad token, as HF ``generate`` does (then, with no stop, the tokens are generate's, draw for draw).

    Returns:
        :class:`~fastopd.train.rollouts.Rollouts` of the kept tokens (a stopped rollout ends after its stopping
        segment, without EOS), with ``segment_ids`` (the finalised segments), ``counts`` and ``online``
        (:class:`OnlineDecisions`).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    check_generation_config(student)
    device = next(student.parameters()).device
    enc = encode_prompts(tokenizer, prompts, chat_template=chat_template, max_prompt_tokens=max_prompt_tokens,
                         device=device)
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    n, p = prompt_ids.shape
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    eos = torch.tensor(eos_ids, device=device)
    warpers = sampling_warpers(temperature, top_k, top_p)
    rows = [_Row(OnlineRelease(min_segments=min_segments, min_gain=min_gain, confirm_segments=confirm_segments))
            for _ in range(n)]

    s_model = _Cached(student)
    scorer = _ChunkScorer(teacher, eos, k=k, temperature=loss_temperature, vocab_size=vocab_size, backend=backend)
    active = torch.arange(n, device=device)  # original row of each batch row
    pmask = prompt_mask  # the prompt's attention mask (left padding), of the batch rows
    pos = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)  # as generate computes them
    first_pos = pos[:, -1] + 1  # position of each row's first completion token
    logits_next = s_model(prompt_ids, prompt_mask, pos, last_only=True)[:, -1].to(dtype=torch.float32, copy=True)
    scorer.prefill(prompt_ids, prompt_mask, pos)
    unfinished = torch.ones(n, dtype=torch.long, device=device)
    pending = None  # the last sampled token of every batch row, not yet read by the student
    steps = read = decode_rows = 0  # tokens sampled, tokens the student has read (per row: all rows alike)
    time_rule = 0.0
    while steps < max_new_tokens and bool(unfinished.any()):
        chunk_tokens, chunk_logits = [], []
        alive = unfinished.clone()  # rows still sampling at the chunk's start
        for _ in range(min(chunk_size, max_new_tokens - steps)):
            if pending is not None:  # the student reads the previous token (generate: its next loop's forward)
                mask = torch.cat([pmask, pmask.new_ones((pmask.shape[0], read + 1))], dim=-1)
                logits_next = s_model(pending[:, None], mask, (first_pos + read)[:, None], last_only=True)[:, -1].to(
                    dtype=torch.float32, copy=True)
                read += 1
            scores = warpers(None, logits_next)
            tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            tok = tok * unfinished + pad * (1 - unfinished)  # ended rows get the pad token, as in generate
            chunk_tokens.append(tok)
            chunk_logits.append(logits_next)
            decode_rows += tok.shape[0]
            unfinished = unfinished & ~torch.isin(tok, eos)
            steps += 1
            pending = tok
            if not bool(unfinished.any()):
                break
        ids = torch.stack(chunk_tokens, dim=1)  # (B, L): completion tokens steps - L .. steps - 1
        chunk = scorer.score(ids, torch.stack(chunk_logits, dim=1), alive, pmask, first_pos, steps)
        keep = []
        t0 = time.perf_counter()
        for i, orig in enumerate(active.tolist()):
            row = rows[orig]
            if row.done:
                continue
            _take(row, i, chunk, ids.shape[1])
            _advance(row, tokenizer, complete=(not bool(unfinished[i])) or steps >= max_new_tokens)
            if row.done:
                unfinished[i] = 0
            else:
                keep.append(i)
        time_rule += time.perf_counter() - t0
        if not keep:
            break
        if compact and len(keep) < active.numel() and s_model.can_select() and scorer.model.can_select():
            sel = torch.tensor(keep, device=device)  # (without a selectable cache the rows stay, fed pads)
            s_model.select(sel)
            scorer.model.select(sel)
            active, pmask, first_pos = active[sel], pmask[sel], first_pos[sel]
            logits_next, scorer.last, unfinished, pending = (logits_next[sel], scorer.last[sel], unfinished[sel],
                                                             pending[sel])
    for row in rows:  # every row has ended above (EOS, the length limit, a stop); this guards max_new_tokens = 0
        if not row.done:
            _advance(row, tokenizer, complete=True)
    return _pack(rows, prompt_ids, prompt_mask, tokenizer, pad, eos_ids, decode_rows, scorer.seconds, time_rule)


def _pack(rows: list, prompt_ids, prompt_mask, tokenizer, pad: int, eos_ids: list[int], decode_rows: int,
          time_teacher: float, time_rule: float) -> Rollouts:
    """The kept tokens of every row as :class:`Rollouts` (the layout of ``generate_completions``), with the
    online decisions."""
    device = prompt_ids.device
    n, p = prompt_ids.shape
    width = max([r.kept for r in rows] + [1])
    comp = torch.full((n, width), pad, dtype=prompt_ids.dtype)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    margins, s_lp, u_lp = (torch.zeros((n, width), dtype=torch.float32) for _ in range(3))
    for b, r in enumerate(rows):
        kept = r.kept
        comp[b, :kept] = torch.tensor(r.tokens[:kept], dtype=prompt_ids.dtype)
        targets[b, :kept] = comp[b, :kept]
        seg[b, :kept] = torch.from_numpy(r.seg[:kept])
        margins[b, :kept] = torch.tensor(r.margins[:kept])
        s_lp[b, :kept] = torch.tensor(r.s[:kept])
        u_lp[b, :kept] = torch.tensor(r.u[:kept])
    lengths = torch.tensor([r.kept for r in rows])
    kept_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    attention_mask = torch.cat([prompt_mask.cpu(), kept_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    ends_eos = torch.tensor([bool(r.kept) and not r.stopped and r.tokens[r.kept - 1] in eos_ids for r in rows])
    texts = tokenizer.batch_decode([r.tokens[:r.kept] for r in rows], skip_special_tokens=True)
    # the rule's decisions and the series it read (each rollout's pushed segments)
    fins = [r.rule.finish() for r in rows]
    decision = OnlineReleaseResult(*(np.concatenate([getattr(f, name) for f in fins]) if fins else np.zeros(0)
                                     for name in ("release_index", "gain", "accepted", "stop_index", "stopped")))
    values = np.concatenate([r.rule.values for r in rows]) if rows else np.zeros(0)
    offsets = np.concatenate([[0], np.cumsum([r.rule.n for r in rows])]).astype(np.int64)
    series = SegmentMeans(values.astype(np.float64), offsets,
                          np.concatenate([np.arange(r.rule.n) for r in rows] + [np.zeros(0)]).astype(np.int64))
    generated = np.array([len(r.tokens) for r in rows], dtype=np.int64)
    scored = np.array([r.scored for r in rows], dtype=np.int64)
    online = OnlineDecisions(decision, series, margins.to(device), s_lp.to(device), u_lp.to(device), generated,
                             scored, decode_rows, time_teacher, time_rule)
    counts = {"generated": int(generated.sum()), "decode_rows": int(decode_rows), "teacher_scored": int(scored.sum())}
    return Rollouts(torch.cat([prompt_ids, comp.to(device)], dim=1), attention_mask.to(device), position_ids.to(device),
                    p, targets.to(device), lengths.to(device), ends_eos.to(device), texts, seg.to(device),
                    counts=counts, online=online)


def online_rollouts(run, student, prompts: list[str]) -> Rollouts:
    """Step 2 of a training step in mode online: :func:`sample_online` with the run's models and options.

    ``student`` is the unwrapped student in eval mode (``generation_model``); the teacher is ``run.teacher``
    unwrapped. Sharded models (FSDP, DeepSpeed ZeRO-3) need every process to run the same forwards while
    sampling, which rollouts that stop at their own places do not: refused there.
    """
    from fastopd.train.rollouts import needs_synced_generation

    cfg, accelerator = run.cfg, run.accelerator
    if needs_synced_generation(accelerator):
        raise ValueError("mode online samples with its own loop, whose forwards differ between processes; it does not "
                         "run under FSDP or DeepSpeed (use DDP, or one process)")
    teacher = accelerator.unwrap_model(run.teacher)
    return sample_online(
        student, teacher, run.tokenizer, prompts, eos_ids=run.eos_ids, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, chunk_size=cfg.online_chunk_size,
        k=run.rule.k, loss_temperature=run.rule.temperature, vocab_size=run.criterion.vocab_size,
        min_segments=cfg.min_segments, min_gain=cfg.min_gain, confirm_segments=cfg.confirm_segments,
        chat_template=cfg.chat_template, max_prompt_tokens=cfg.max_prompt_tokens, backend=run.rule.backend)

# ----------------------------------------------------------------------------------------------------------
# Hugging Face generate: a StoppingCriteria with a per-sequence stop
# ----------------------------------------------------------------------------------------------------------


class _RecordLogits:
    """A ``LogitsProcessor`` that keeps a copy of the logits it is given (the student's, before the sampling
    warpers) and returns them unchanged."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.rows.append(scores.detach().to(dtype=torch.float32, copy=True))
        return scores


def __getattr__(name: str):
    # OnlineReleaseStopping subclasses transformers.StoppingCriteria: built on first use, so that importing the
    # trainer does not import transformers
    if name == "OnlineReleaseStopping":
        from transformers import StoppingCriteria

        cls = type("OnlineReleaseStopping", (_OnlineReleaseStopping, StoppingCriteria),
                   {"__doc__": _OnlineReleaseStopping.__doc__, "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _OnlineReleaseStopping:
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
    length must be dropped. The trainer's own sampler (:func:`sample_online`) drops ended rows from both KV
    caches instead.

    Args:
        teacher: the teacher (a causal LM on the student's device, eval mode).
        tokenizer: the tokenizer of both (segmentation).
        attention_mask: (B, P) the prompts' attention mask given to ``generate`` (left padding).
        eos_ids: ids that end a sequence (default: the tokenizer's EOS).
        chunk_size, k, temperature, vocab_size, backend, min_segments, min_gain, confirm_segments: as in
            :func:`sample_online` (``temperature`` is the margin's tau, not the sampling temperature).
    """

    def __init__(self, teacher, tokenizer, attention_mask: torch.Tensor, *, eos_ids: list[int] | None = None,
                 chunk_size: int = 16, k: int = 16, temperature: float = 1.0, vocab_size: int | None = None,
                 min_segments: int = 2, min_gain: float = 10.0, confirm_segments: int = 2, backend: str = "auto"):
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be the (B, P) attention mask of the prompts given to generate")
        eos_ids = [tokenizer.eos_token_id] if eos_ids is None else list(eos_ids)
        self.tokenizer = tokenizer
        self.pmask = attention_mask
        self.chunk_size = chunk_size
        self.logits_processor = _RecordLogits()
        self.rows = [_Row(OnlineRelease(min_segments=min_segments, min_gain=min_gain,
                                        confirm_segments=confirm_segments)) for _ in range(attention_mask.shape[0])]
        self.eos_ids = eos_ids
        self.scorer = _ChunkScorer(teacher, torch.tensor(eos_ids, device=attention_mask.device), k=k,
                                   temperature=temperature, vocab_size=vocab_size, backend=backend)
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
        chunk = self.scorer.score(ids, torch.stack(rows_logits, dim=1), alive, self.pmask, self.first_pos, steps)
        self.logits_processor.rows = []
        self.scored = steps
        ended = torch.isin(ids, self.scorer.eos).any(1)
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            _take(row, i, chunk, length)
            _advance(row, self.tokenizer, complete=complete or bool(ended[i]))
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
                    _advance(row, self.tokenizer, complete=True)
            fins = [r.rule.finish() for r in self.rows]
            decision = OnlineReleaseResult(*(np.concatenate([getattr(f, name) for f in fins])
                                             for name in ("release_index", "gain", "accepted", "stop_index",
                                                          "stopped")))
            values = np.concatenate([r.rule.values for r in self.rows])
            offsets = np.concatenate([[0], np.cumsum([r.rule.n for r in self.rows])]).astype(np.int64)
            ids = np.concatenate([np.arange(r.rule.n) for r in self.rows]).astype(np.int64)
            self._result = OnlineGenerateResult(
                decision, SegmentMeans(values, offsets, ids), np.array([r.kept for r in self.rows], dtype=np.int64),
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

# ----------------------------------------------------------------------------------------------------------
# The loss of mode online: the kept prefix, weighted by the decision made while sampling
# ----------------------------------------------------------------------------------------------------------


def online_weights(rollouts: Rollouts) -> tuple[ReleaseDecision, torch.Tensor]:
    """The decision of the online sampler as the trainer's :class:`fastopd.ReleaseDecision`, and §4's weights.

    The weights are :func:`fastopd.release_weights` of the release segment (the stop's r, or the whole series'
    decision) over the rollout's valid tokens, i.e. the tokens of its segments [0, n'): exactly the release
    rule's weights on the same margins and segments (docs/formulas.md §8).
    """
    t0 = time.perf_counter()
    online: OnlineDecisions = rollouts.online
    seg, valid = rollouts.segment_ids, rollouts.valid
    scan = online.decision
    release_segment = release_segment_ids(online.series, scan)
    weights = release_weights(seg, valid, release_segment)
    release_fraction = release_fractions(seg, valid, release_segment)
    dec = make_decision(weights, valid, scan, release_segment, release_fraction, online.series, t0)
    return dec, weights


def kept_rollouts(rollouts: Rollouts, weights: torch.Tensor) -> Rollouts:
    """The rollouts cut to their supervised prefix (w_t > 0): what the training forwards read.

    Tokens past it have w_t = 0, so the loss and its gradient are those of the whole rollouts (a causal LM's
    outputs at a position do not depend on later tokens); the completion width is the longest kept prefix.
    """
    keep = (weights > 0) & rollouts.valid.to(weights.device)
    keep = keep.to(rollouts.targets.device)
    kept_len = keep.long().sum(-1)
    width = max(int(kept_len.max()) if kept_len.numel() else 0, 1)
    p = rollouts.prompt_width
    inside = torch.arange(width, device=keep.device)[None] < kept_len[:, None]
    mask = torch.cat([rollouts.attention_mask[:, :p], inside.to(rollouts.attention_mask.dtype)], dim=1)
    return Rollouts(rollouts.input_ids[:, :p + width], mask, rollouts.position_ids[:, :p + width], p,
                    rollouts.targets[:, :width].masked_fill(~inside, IGNORE_INDEX), kept_len, rollouts.stopped,
                    rollouts.texts, rollouts.segment_ids[:, :width].masked_fill(~inside, -1))


def online_loss(run, rollouts: Rollouts, times: dict | None = None):
    """Steps 4-5 of a training step in mode online (docs/formulas.md §8).

    The weights come from the decision made while sampling (:func:`online_weights`); the teacher and the student
    then run over each rollout's kept prefix only (:func:`kept_rollouts`), and the loss is divided by the number
    of valid tokens of the whole rollouts, so it equals the ``release`` mode's loss with these weights. The
    returned ``OPDOutput`` has ``release`` = the decision, and ``metrics`` whose ``adv_mean`` / ``margin_mean`` /
    ``num_valid`` are over every valid token (from the sampling-time statistics: the released tokens are not
    forwarded again) and whose rule diagnostics are the online decision's.
    """
    import contextlib

    from fastopd.loss import OPDLoss
    from fastopd.train.hidden import hidden_loss
    from fastopd.train.rollouts import completion_logits

    cfg, accelerator = run.cfg, run.accelerator
    dec, weights = online_weights(rollouts)
    kept = kept_rollouts(rollouts, weights)
    w = weights[:, :kept.targets.shape[1]].to(kept.targets.device)
    valid = rollouts.valid
    normalizer = max(float(valid.sum()), 1.0)
    crit = OPDLoss(cfg.loss, k=run.rule.k, temperature=run.rule.temperature, ignore_index=IGNORE_INDEX,
                   vocab_size=run.criterion.vocab_size, backend=run.rule.backend)
    autocast = getattr(accelerator, "autocast", None) or contextlib.nullcontext
    device = getattr(accelerator, "device", None)
    if cfg.loss_from == "hidden":
        out = hidden_loss(crit, run.student, run.teacher, kept, autocast=autocast,
                          chunk_size=cfg.loss_chunk_size or None, times=times, weights=w, normalizer=normalizer)
    else:
        t0 = time.perf_counter()
        with torch.no_grad(), autocast():
            teacher_logits = completion_logits(run.teacher, kept)
        if times is not None:
            if getattr(device, "type", None) == "cuda":
                torch.cuda.synchronize(device)
            times["teacher"] = time.perf_counter() - t0
        out = crit(completion_logits(run.student, kept), teacher_logits, kept.targets, weights=w, normalizer=normalizer)
    online = rollouts.online
    v = valid.to(online.margins.device)
    n_valid = int(v.sum())
    out.metrics.update(
        adv_mean=float((online.teacher_logprobs - online.student_logprobs)[v].sum()) / max(n_valid, 1),
        margin_mean=float(online.margins[v].sum()) / max(n_valid, 1), num_valid=n_valid,
        num_kept=int(dec.totals["kept"]))
    out.metrics.update(dec.metrics)  # accept_rate, gain_mean, kept_fraction (of the valid tokens), release_position
    out.release = dec
    rollouts.counts.update(teacher_forwarded=int(kept.targets.numel()), student_forwarded=int(kept.targets.numel()))
    return out
