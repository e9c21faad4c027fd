"""Per-chunk Triton forward/backward of the hidden-state OPD loss (docs/formulas.md §6; driver: fastopd.linear).

For one token chunk of logits tiles z_S, z_T (chunk, V), already produced by the head matmuls:

- forward: the fused stats kernel (:func:`fastopd.kernels.token_stats.launch_token_stats`) on the tiles, then
  :func:`fastopd.common.per_token_loss` (the same per-token loss and coefficient c_t as
  :func:`fastopd.kernels.opd_loss_triton`) with w = valid; only the per-token vectors and the (NUM_OUT, chunk) row
  statistics (M, log Z of both models, KL) that the backward kernel reads are kept.
- backward: the loss-backward kernel on the recomputed student tile (and teacher tile for ``reverse_kl`` and
  ``forward_kl``),
  with c_t times the incoming gradient; it writes dl/dz_S into the student tile itself (no third tile)
  unless the head soft-caps, whose chain rule still reads z.
"""

from __future__ import annotations

import torch

from fastopd.common import per_token_loss
from fastopd.kernels._helpers import NUM_OUT, OUT_ADV, OUT_KL, OUT_MARGIN, OUT_S, OUT_U, Rows, loss_kl
from fastopd.kernels.loss_backward import launch_loss_backward
from fastopd.kernels.token_stats import launch_token_stats
from fastopd.types import TokenStats


class TritonChunks:
    """The Triton backend of :class:`fastopd.linear._LinearOPDFunction`, one chunk at a time."""

    def __init__(self, plan, *, inplace: bool) -> None:
        """``plan``: the call's :class:`fastopd.linear.ChunkPlan`; ``inplace``: the backward kernel may write
        dl/dz into the student tile (False when the head soft-caps: its chain rule reads z after)."""
        self.plan = plan
        self.inplace = inplace
        self.kl = loss_kl(plan.loss)  # the divergence in row OUT_KL: None (pg), "reverse" or "forward"
        self.opts = plan.chunk_options()

    def alloc(self, n: int, device) -> dict:
        return {
            "coef": torch.zeros(n, dtype=torch.float32, device=device),
            "out": torch.zeros((int(NUM_OUT), n), dtype=torch.float32, device=device),
        }

    def forward(self, zs, zt, tgt, old, saved, sl):
        p = self.plan
        out, _ = launch_token_stats(Rows(zs), Rows(zt), tgt, self.opts, v=p.v, kl=self.kl, return_topk=False)
        valid = tgt != self.opts.ignore_index
        w = valid.float()
        # The same per-token loss and row factor c_t as fastopd.kernels.opd_loss_triton (common.per_token_loss).
        if self.kl is not None:
            terms = per_token_loss(p.loss, valid, w, kl=out[OUT_KL.value])
            adv = out[OUT_ADV.value].clone()
        else:
            terms = per_token_loss("pg", valid, w, s=out[OUT_S.value], u=out[OUT_U.value], old_logprobs=old)
            adv = terms.advantages
        saved["coef"][sl] = terms.coef
        saved["out"][:, sl] = out
        stats = TokenStats(
            student_logprobs=out[OUT_S.value], teacher_logprobs=out[OUT_U.value], advantages=adv,
            margins=out[OUT_MARGIN.value], valid=valid,
        )
        if self.kl is not None:  # TokenStats.reverse_kl / .forward_kl
            setattr(stats, p.loss, out[OUT_KL.value])
        return terms.per_token, stats

    def forward_grad(self, zs, zt, tgt, old, saved, sl, g):
        """:meth:`forward`, then the backward kernel on the same live tiles (the eager path)."""
        per_token, stats = self.forward(zs, zt, tgt, old, saved, sl)
        return per_token, stats, self.backward(zs, zt, tgt, old, saved, sl, g)

    def backward(self, zs, zt, tgt, old, saved, sl, g):
        p = self.plan
        coef = (g.float() * saved["coef"][sl]).contiguous()
        return launch_loss_backward(
            Rows(zs), Rows(zt if zt is not None else zs), tgt, coef, saved["out"][:, sl].contiguous(), v=p.v,
            temperature=self.opts.temperature, loss=p.loss, inplace=self.inplace,
        )
