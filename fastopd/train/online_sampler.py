"""The trainer's online sampler (docs/formulas.md §8): rollouts that stop where the release rule releases them.

``sampler: online`` replaces HF ``generate`` in step 1 of a training step (:mod:`fastopd.train.trainer`):

1. the student samples the rollouts in chunks of ``chunk_size`` tokens with its own KV cache, exactly as HF
   ``generate`` samples (the same forwards, temperature / top-k / top-p warpers, ``torch.multinomial``);
2. after each chunk the teacher scores the chunk's tokens with its own KV cache
   (:class:`fastopd.train.chunk_scorer.ChunkScorer`: margins m_t and log-probs from the student's sampling
   logits and the teacher's);
3. each rollout's :class:`fastopd.OnlineRollout` segments its text so far and feeds its newly finalised segments'
   means to its rule; a rollout whose rule stops ends there: it is cut after the stopping segment (no EOS) and
   leaves the batch (both KV caches drop its row), so neither model reads its suffix;
4. the rollouts come back with the rule's decision and §4's weights over the tokens of their segments [0, n')
   (:func:`online_weights`): the step trains each rollout's kept prefix with them.

A rollout that ends (EOS, ``max_new_tokens``) without a stop gets the offline decision on its whole series: the
``release`` weights on the same margins (tested). For a user's own ``generate`` loop:
:class:`fastopd.integrations.hf_stopping.OnlineReleaseStopping`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fastopd.common import release_fractions, release_segment_ids
from fastopd.online import OnlineRollout, collect
from fastopd.release import ReleaseDecision, make_decision, release_weights
from fastopd.train.chunk_scorer import CachedModel, ChunkScorer
from fastopd.train.rollouts import IGNORE_INDEX, Rollouts, encode_prompts, needs_synced_generation
from fastopd.types import OnlineReleaseResult, SegmentMeans

__all__ = ["OnlineDecisions", "online_weights", "sample_online", "sample_online_run", "sampling_warpers"]


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
                f"the online sampler samples with temperature, top_k and top_p only, but the student's generation_config "
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
        teacher_scored: int64 (N,) tokens of each rollout the teacher scored while sampling (= ``generated``).
        decode_rows: rows x decode steps of the student's sampling forwards (the batch shrinks as rollouts end;
            a row that ends inside a chunk is fed pads to the chunk's end).
        teacher_positions: rows x positions of the teacher's chunk forwards (those pads included).
        time_teacher: seconds of the teacher's prefill, chunk forwards and chunk statistics (CUDA-synchronised).
        time_rule: seconds of the segmentation so far, the segment means and the rule's scans while sampling
            (:func:`online_weights`' are ``release.elapsed_s``).
        release, weights: :func:`online_weights` of the rollouts: the decision and the per-token weights the
            step trains with.
        teacher_hidden: (N, C, H) the teacher's final hidden states that predict each kept token, from the chunk
            scoring (``keep_teacher_hidden``; 0 past each rollout's kept tokens), or None: the hidden-state loss
            reads them instead of forwarding the teacher again (:func:`fastopd.train.trainer.completion_loss`).
    """

    decision: OnlineReleaseResult
    series: SegmentMeans
    margins: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    generated: np.ndarray
    teacher_scored: np.ndarray
    decode_rows: int = 0
    teacher_positions: int = 0
    time_teacher: float = 0.0
    time_rule: float = 0.0
    release: ReleaseDecision | None = None  # the decision as the trainer logs it (online_weights)
    weights: torch.Tensor | None = None  # §4's weights over the rollouts' tokens (online_weights)
    teacher_hidden: torch.Tensor | None = None

    def record(self, b: int) -> dict:
        """Rollout b's online fields for ``rollouts.jsonl``."""
        d = self.decision
        return {"online_stopped": bool(d.stopped[b]), "stop_index": int(d.stop_index[b]),
                "release_index": int(d.release_index[b]), "tokens_generated": int(self.generated[b])}



@torch.no_grad()
def sample_online(student, teacher, tokenizer, prompts: list[str], *, eos_ids: list[int], max_new_tokens: int,
                  sampling_temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, chunk_size: int = 16,
                  stats=None, min_segments: int = 2, min_gain: float = 10.0, confirm_segments: int = 2,
                  chat_template: bool = False, max_prompt_tokens: int = 512, compact: bool = True,
                  keep_teacher_hidden: bool = False) -> Rollouts:
    """Sample the prompts' rollouts with the online release rule (module docstring, docs/formulas.md §8).

    Args:
        student, teacher: plain (unwrapped) causal LMs in eval mode, on one device.
        tokenizer, prompts, eos_ids, max_new_tokens, top_p, top_k, chat_template, max_prompt_tokens: as
            :func:`fastopd.train.rollouts.generate_completions`; ``sampling_temperature`` is its ``temperature``.
        chunk_size: tokens sampled between two scorings by the teacher (and two looks at the segments).
        stats: the margin's options, a :class:`fastopd.StatsOptions` (k, the loss temperature tau, vocab_size,
            backend; default ``StatsOptions()``).
        min_segments, min_gain, confirm_segments: the rule's (:class:`fastopd.OnlineRelease`).
        compact: drop ended rollouts from both models' batches (their KV-cache rows); False keeps them, fed the
            pad token, as HF ``generate`` does (then, with no stop, the tokens are generate's, draw for draw).
        keep_teacher_hidden: keep the teacher's final hidden states of the kept tokens from the chunk scoring
            (``online.teacher_hidden``), for a hidden-state loss without a second teacher forward.

    Returns:
        :class:`~fastopd.train.rollouts.Rollouts` of the kept tokens (a stopped rollout ends after its stopping
        segment, without EOS), with ``segment_ids`` (the finalised segments), ``counts`` and ``online``
        (:class:`OnlineDecisions`, with the rule's decision and §4's weights).
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
    warpers = sampling_warpers(sampling_temperature, top_k, top_p)
    rows = [OnlineRollout(min_segments=min_segments, min_gain=min_gain, confirm_segments=confirm_segments)
            for _ in range(n)]
    s_model = CachedModel(student)
    scorer = ChunkScorer(teacher, eos, stats=stats, keep_hidden=keep_teacher_hidden)
    active = torch.arange(n, device=device)  # original row of each batch row
    # the attention mask of prompt + every completion position, allocated once (generate concatenates a column
    # per step); the student's forward at step t reads its first p + t + 1 columns
    mask = torch.cat([prompt_mask, prompt_mask.new_ones((n, max(max_new_tokens, 1)))], dim=-1)
    pos = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)  # as generate computes them
    first_pos = pos[:, -1] + 1  # position of each row's first completion token
    logits_next = s_model(prompt_ids, prompt_mask, pos, last_only=True)[:, -1].to(dtype=torch.float32, copy=True)
    scorer.prefill(prompt_ids, prompt_mask, pos)
    unfinished = torch.ones(n, dtype=torch.bool, device=device)
    pad_t = torch.tensor(pad, dtype=prompt_ids.dtype, device=device)
    eos_list = eos.tolist()
    pending = None  # the last sampled token of every batch row, not yet read by the student
    steps = read = decode_rows = teacher_positions = 0  # tokens sampled, tokens the student has read (all rows)
    time_rule = 0.0
    hidden_chunks = []  # (original rows, first step, teacher hidden (B, L, H)) per chunk (keep_teacher_hidden)
    while steps < max_new_tokens:
        chunk_tokens, chunk_logits = [], []
        alive = unfinished.clone()  # rows still sampling at the chunk's start
        length = min(chunk_size, max_new_tokens - steps)
        for _ in range(length):
            if pending is not None:  # the student reads the previous token (generate: its next loop's forward)
                logits_next = s_model(pending[:, None], mask[:, :p + read + 1], (first_pos + read)[:, None],
                                      last_only=True)[:, -1].to(dtype=torch.float32, copy=True)
                read += 1
            scores = warpers(None, logits_next) if warpers else logits_next
            tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            tok = torch.where(unfinished, tok, pad_t)  # ended rows get the pad token, as in generate
            chunk_tokens.append(tok)
            chunk_logits.append(logits_next)
            decode_rows += tok.shape[0]
            ended = tok == eos_list[0] if len(eos_list) == 1 else torch.isin(tok, eos)
            unfinished &= ~ended
            steps += 1
            pending = tok
            if not bool(unfinished.any()):
                break
        ids = torch.stack(chunk_tokens, dim=1)  # (B, L): completion tokens steps - L .. steps - 1
        c_ids, c_valid, c_m, c_s, c_u = scorer.score(ids, torch.stack(chunk_logits, dim=1), alive, mask[:, :p],
                                                     first_pos, steps)
        teacher_positions += ids.numel()
        if keep_teacher_hidden:
            hidden_chunks.append((active, steps - ids.shape[1], scorer.hidden))
        keep = []
        t0 = time.perf_counter()
        ended_rows = (~unfinished).tolist()
        for i, orig in enumerate(active.tolist()):
            row = rows[orig]
            if row.done:
                continue
            got = c_valid[i]
            m = int(got.sum())
            row.add(c_ids[i][:m].tolist(), c_m[i][:m].tolist(), c_s[i][:m].tolist(), c_u[i][:m].tolist(), scored=m)
            if row.advance(tokenizer, complete=ended_rows[i] or steps >= max_new_tokens):
                unfinished[i] = False
            else:
                keep.append(i)
        time_rule += time.perf_counter() - t0
        if not keep:
            break
        if compact and len(keep) < active.numel() and s_model.can_select() and scorer.model.can_select():
            sel = torch.tensor(keep, device=device)  # (without a selectable cache the rows stay, fed pads)
            s_model.select(sel)
            scorer.select(sel)
            active, mask, first_pos = active[sel], mask[sel], first_pos[sel]
            logits_next, unfinished, pending = logits_next[sel], unfinished[sel], pending[sel]
    t0 = time.perf_counter()
    for row in rows:  # every row has ended above (EOS, the length limit, a stop); this guards max_new_tokens = 0
        if not row.done:
            row.advance(tokenizer, complete=True)
    time_rule += time.perf_counter() - t0
    rollouts = _pack(rows, prompt_ids, prompt_mask, tokenizer, pad, eos_ids, decode_rows, scorer.seconds, time_rule)
    rollouts.online.teacher_positions = teacher_positions
    if keep_teacher_hidden:
        rollouts.online.teacher_hidden = _kept_hidden(hidden_chunks, rollouts.lengths, n)
    rollouts.online.release, rollouts.online.weights = online_weights(rollouts)  # timed in release.elapsed_s
    return rollouts


def _kept_hidden(chunks: list, lengths: torch.Tensor, n: int) -> torch.Tensor | None:
    """The chunks' teacher hidden states at the kept tokens, (N, C, H) with C the longest kept length; 0 past each
    rollout's kept tokens."""
    if not chunks:
        return None
    first = chunks[0][2]
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    out = first.new_zeros((n, width, first.shape[-1]))
    for rows, start, hidden in chunks:
        if start >= width:
            break
        take = min(hidden.shape[1], width - start)
        out[rows, start:start + take] = hidden[:, :take]
    keep = torch.arange(width, device=out.device)[None] < lengths.to(out.device)[:, None]
    return out.masked_fill_(~keep[..., None], 0)


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
    decision, series = collect(rows)  # the rule's decisions and the series it read (each rollout's pushed segments)
    generated = np.array([len(r.tokens) for r in rows], dtype=np.int64)
    scored = np.array([r.scored for r in rows], dtype=np.int64)
    online = OnlineDecisions(decision, series, margins.to(device), s_lp.to(device), u_lp.to(device), generated,
                             scored, decode_rows=decode_rows, time_teacher=time_teacher, time_rule=time_rule)
    counts = {"generated": int(generated.sum()), "decode_rows": int(decode_rows), "teacher_scored": int(scored.sum())}
    return Rollouts(torch.cat([prompt_ids, comp.to(device)], dim=1), attention_mask.to(device), position_ids.to(device),
                    p, targets.to(device), lengths.to(device), ends_eos.to(device), texts, seg.to(device),
                    counts=counts, online=online)


def sample_online_run(run, student, prompts: list[str]) -> Rollouts:
    """Step 1 of a training step with ``sampler: online``: :func:`sample_online` with the run's models and options.

    ``student`` is the unwrapped student in eval mode (``generation_model``); the teacher is ``run.teacher``
    unwrapped. Sharded models (FSDP, DeepSpeed ZeRO-3) need every process to run the same forwards while
    sampling, which rollouts that stop at their own places do not: refused there.
    """
    cfg, accelerator = run.cfg, run.accelerator
    if needs_synced_generation(accelerator):
        raise ValueError("sampler online samples with its own loop, whose forwards differ between processes; it does not "
                         "run under FSDP or DeepSpeed (use DDP, or one process)")
    teacher = accelerator.unwrap_model(run.teacher)
    return sample_online(
        student, teacher, run.tokenizer, prompts, eos_ids=run.eos_ids, max_new_tokens=cfg.max_new_tokens,
        sampling_temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, chunk_size=cfg.online_chunk_size,
        stats=run.criterion.options, min_segments=cfg.min_segments, min_gain=cfg.min_gain,
        confirm_segments=cfg.confirm_segments, chat_template=cfg.chat_template,
        max_prompt_tokens=cfg.max_prompt_tokens, keep_teacher_hidden=cfg.loss_from == "hidden")


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



def online_metrics(out, rollouts: Rollouts) -> None:
    """Set ``out``'s metrics and decision to the online sampler's: the loss forwards read only the kept prefix, so
    ``adv_mean`` / ``margin_mean`` / ``num_valid`` are taken over every valid token from the sampling-time
    statistics (the released tokens are not forwarded again), and the rule's diagnostics (accept_rate, gain_mean,
    kept_fraction of the valid tokens, release_position) are the online decision's."""
    online: OnlineDecisions = rollouts.online
    dec = online.release
    v = rollouts.valid.to(online.margins.device)
    n_valid = int(v.sum())
    out.metrics.update(
        adv_mean=float((online.teacher_logprobs - online.student_logprobs)[v].sum()) / max(n_valid, 1),
        margin_mean=float(online.margins[v].sum()) / max(n_valid, 1), num_valid=n_valid,
        num_kept=int(dec.totals["kept"]))
    out.metrics.update(dec.metrics)
    out.release = dec
