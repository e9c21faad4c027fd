"""Per-chunk Triton forward/backward of the hidden-state OPD loss (docs/formulas.md §6; driver: fastopd.linear).

For one token chunk of logits tiles z_S, z_T (chunk, V), already produced by the head matmuls:

- forward: the fused stats kernel (:func:`fastopd.kernels.token_stats.launch_token_stats`) on the tiles, then
  :func:`fastopd.kernels.autograd.loss_terms` (the same per-token loss and coefficient c_t as
  :func:`fastopd.kernels.opd_loss_triton`) with w = valid; only the per-token vectors and the (5, chunk) row
  statistics [M_S, log Z_S, M_T, log Z_T, KL] are kept.
- backward: the loss-backward kernel on the recomputed student tile (and teacher tile for ``reverse_kl``),
  with c_t times the incoming gradient; it writes dl/dz_S into the student tile itself (no third tile)
  unless the head soft-caps, whose chain rule still reads z.
"""

from __future__ import annotations

import torch

from fastopd.kernels._helpers import Rows
from fastopd.kernels.autograd import loss_terms
from fastopd.kernels.loss_backward import launch_loss_backward
from fastopd.kernels.token_stats import OUT_KL, OUT_MARGIN, OUT_S, OUT_U, launch_token_stats
from fastopd.types import TokenStats


class TritonChunks:
    """The Triton backend of :class:`fastopd.linear._LinearOPDFunction`, one chunk at a time."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.reverse_kl = cfg["loss"] == "reverse_kl"

    def alloc(self, n: int, device) -> dict:
        return {
            "coef": torch.zeros(n, dtype=torch.float32, device=device),
            "stat": torch.zeros((5, n), dtype=torch.float32, device=device),
        }

    def forward(self, zs, zt, tgt, old, saved, sl):
        c = self.cfg
        out, _ = launch_token_stats(
            Rows(zs), Rows(zt), tgt, v=c["v"], k=c["k"], temperature=c["temperature"],
            ignore_index=c["ignore_index"], full_kl=self.reverse_kl, return_topk=False,
        )
        valid = tgt != c["ignore_index"]
        per_token, coef, adv, stat = loss_terms(out, valid, None, old, self.reverse_kl)
        saved["coef"][sl] = coef
        saved["stat"][:, sl] = stat
        stats = TokenStats(
            student_logprobs=out[OUT_S], teacher_logprobs=out[OUT_U], advantages=adv,
            margins=out[OUT_MARGIN], valid=valid, reverse_kl=out[OUT_KL] if self.reverse_kl else None,
        )
        return per_token, stats

    def forward_grad(self, zs, zt, tgt, old, saved, sl, g):
        """:meth:`forward`, then the backward kernel on the same live tiles (the eager path)."""
        per_token, stats = self.forward(zs, zt, tgt, old, saved, sl)
        return per_token, stats, self.backward(zs, zt, tgt, old, saved, sl, g)

    def backward(self, zs, zt, tgt, old, saved, sl, g):
        c = self.cfg
        coef = (g.float() * saved["coef"][sl]).contiguous()
        stat = saved["stat"][:, sl].contiguous()
        return launch_loss_backward(
            Rows(zs), Rows(zt if zt is not None else zs), tgt, coef, stat, v=c["v"],
            temperature=c["temperature"], reverse_kl=self.reverse_kl, inplace=c["s_cap"] is None,
        )
