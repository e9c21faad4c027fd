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

IGNORE_INDEX = -100


class CachedModel:
    """One model with its KV cache over a (shrinking) batch: prefill, then forwards of new tokens."""

    def __init__(self, model):
        self.model = model
        # the cache argument's name: ``cache`` in transformers 5, ``past_key_values`` before
        self.cache_arg = "cache" if forward_accepts(model, "cache") else "past_key_values"
        self.keep_arg = forward_accepts(model, "logits_to_keep")
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



class ChunkScorer:
    """The teacher with its KV cache, scoring each chunk of sampled tokens: the margins, log-probs and valid mask
    of the chunk (:func:`fastopd.token_stats` on the student's sampling logits and the teacher's)."""

    def __init__(self, teacher, eos: torch.Tensor, *, k: int, temperature: float, vocab_size, backend: str):
        self.model = CachedModel(teacher)
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

