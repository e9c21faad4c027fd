"""A model with its KV cache over a shrinking batch, and the teacher scoring chunks of sampled tokens with it.

Shared by the trainer's online sampler (:mod:`fastopd.train.online_sampler`) and the Hugging Face stopping
criterion (:mod:`fastopd.integrations.hf_stopping`): after each chunk the teacher reads the chunk's tokens with
its own cache, and :func:`fastopd.token_stats` gives each token's margin m_t and log-probs s_t, u_t from the
teacher's logits and the student's logits the token was sampled from (docs/formulas.md §1, §8).
"""

from __future__ import annotations

import time

import torch

from fastopd.train.models import forward_accepts


class CachedModel:
    """One model with its KV cache over a (shrinking) batch: prefill, then forwards of new tokens."""

    def __init__(self, model):
        self.model = model
        # the cache argument's name: ``cache`` in transformers 5, ``past_key_values`` before
        self.cache_arg = "cache" if forward_accepts(model, "cache") else "past_key_values"
        self.keep_arg = forward_accepts(model, "logits_to_keep")
        self.cache = None

    def __call__(self, ids, mask, pos, *, last_only: bool, hidden: bool = False):
        """The logits of the new tokens ``ids`` (the last position's only with ``last_only``); with ``hidden``,
        (logits, final hidden states of every new position: ``hidden_states[-1]``, what the LM head reads)."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True,
                  self.cache_arg: self.cache}
        if last_only and self.keep_arg:
            kwargs["logits_to_keep"] = 1
        if hidden:
            kwargs["output_hidden_states"] = True
        out = self.model(**kwargs)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        logits = out.logits[:, -1:] if last_only else out.logits
        return (logits, out.hidden_states[-1]) if hidden else logits

    def can_select(self) -> bool:
        return hasattr(self.cache, "batch_select_indices")

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch in the cache."""
        self.cache.batch_select_indices(rows)



class ChunkScorer:
    """The teacher with its KV cache, scoring each chunk of sampled tokens: the margins, log-probs and valid mask
    of the chunk (:func:`fastopd.token_stats` on the student's sampling logits and the teacher's).

    ``keep_hidden``: after each :meth:`score`, :attr:`hidden` holds the teacher's final hidden states that predict
    the chunk's tokens (B, L, H; ``hidden_states[-1]``, what its LM head reads), so that a hidden-state loss needs
    no second teacher forward over the same tokens. :attr:`seconds`: the prefill, the chunks' forwards and their
    statistics (CUDA-synchronised).
    """

    def __init__(self, teacher, eos: torch.Tensor, *, stats=None, keep_hidden: bool = False):
        from fastopd.options import StatsOptions

        self.model = CachedModel(teacher)
        self.eos = eos
        self.stats = StatsOptions.of(stats)  # the margin's options (k, the loss temperature tau, vocab_size, backend)
        self.keep_hidden = bool(keep_hidden)
        self.last = None  # the teacher's logits that predict the next chunk's first token
        self.last_hidden = None  # ... and its final hidden state (keep_hidden)
        self.hidden = None  # the last chunk's (keep_hidden)
        self.seconds = 0.0

    def _sync(self, device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def prefill(self, prompt_ids, pmask, pos) -> None:
        t0 = time.perf_counter()
        out = self.model(prompt_ids, pmask, pos, last_only=True, hidden=self.keep_hidden)
        if self.keep_hidden:
            out, hidden = out
            self.last_hidden = hidden[:, -1]
        self.last = out[:, -1]
        self.seconds += self._sync(prompt_ids.device) - t0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (the KV cache and the logits / hidden state of the next position)."""
        self.model.select(rows)
        self.last = self.last[rows]
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[rows]

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
        logits = self.model(ids, mask, pos, last_only=False, hidden=self.keep_hidden)
        if self.keep_hidden:
            logits, hidden = logits
            self.hidden = torch.cat([self.last_hidden[:, None], hidden[:, :-1]], dim=1)
            self.last_hidden = hidden[:, -1]
        teacher_rows = torch.cat([self.last[:, None], logits[:, :-1]], dim=1)
        self.last = logits[:, -1]
        # the chunk positions that are tokens of their rollout: up to and including its first EOS
        is_eos = torch.isin(ids, self.eos).long()
        valid = ((is_eos.cumsum(1) - is_eos) == 0) & alive.bool()[:, None]
        stats = token_stats(student_logits, teacher_rows, ids.masked_fill(~valid, self.stats.ignore_index),
                            options=self.stats)
        res = (ids.cpu().numpy(), valid.cpu().numpy(), stats.margins.float().cpu().numpy(),
               stats.student_logprobs.float().cpu().numpy(), stats.teacher_logprobs.float().cpu().numpy())
        self.seconds += self._sync(device) - t0
        return res
