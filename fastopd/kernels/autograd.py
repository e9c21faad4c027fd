"""``opd_loss_triton``: the OPD loss of docs/formulas.md §5 over the fused kernels, as an autograd Function.

Forward: the stats kernel (one streaming pass per row over both models), then O(N) arithmetic for the
per-token loss. Backward: the per-row gradient kernel of :mod:`fastopd.kernels.loss_backward`. Between the
two only O(N) fp32 tensors are kept (the stats kernel's (NUM_OUT, N) buffer, whose rows M_S, log Z_S, M_T,
log Z_T and KL_t the backward reads, and the per-row factor c_t) plus
references to the logits themselves; no N x V softmax is ever stored.

The Function returns the *per-token* loss l_t, so both ``out.per_token`` and ``out.loss`` (their sum over
the normaliser) are differentiable, and any reduction a trainer applies to ``per_token`` works: the
gradient arriving at l_t scales row t of the backward kernel.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastopd._validate import check_token_inputs
from fastopd.common import DIVERGENCES, check_loss_options, per_token_loss, reduce_loss, weight_mask
from fastopd.kernels._helpers import (
    OUT_ADV,
    OUT_KL,
    OUT_MARGIN,
    OUT_S,
    OUT_U,
    Rows,
    check_kernel_dtype,
    loss_kl,
)
from fastopd.kernels.loss_backward import launch_loss_backward
from fastopd.kernels.token_stats import launch_token_stats
from fastopd.kernels.token_stats_split import check_splits
from fastopd.options import StatsOptions
from fastopd.types import OPDOutput, TokenStats


class _OPDLossFunction(torch.autograd.Function):
    """per_token = l_t(z_S) with a kernel backward; teacher logits, weights and old log-probs get no gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, target_ids, w, old_logprobs, cfg):
        student, teacher = Rows(student_logits), Rows(teacher_logits)
        loss = cfg["loss"]
        kl = loss_kl(loss)  # the divergence the loss reads from row OUT_KL (None for pg)
        opts = cfg["options"]
        out, _ = launch_token_stats(
            student, teacher, target_ids, opts, v=cfg["v"], kl=kl, return_topk=False,
            block_v=cfg["block_v"], group=cfg["group"], topk_impl=cfg["topk_impl"], splits=cfg["splits"],
        )
        valid = (target_ids != opts.ignore_index).reshape(-1)
        w = w.reshape(-1)
        if kl is not None:
            terms = per_token_loss(loss, valid, w, kl=out[OUT_KL.value])
            adv = out[OUT_ADV.value].clone()
        else:
            old = None if old_logprobs is None else old_logprobs.reshape(-1)
            terms = per_token_loss("pg", valid, w, s=out[OUT_S.value], u=out[OUT_U.value], old_logprobs=old)
            adv = terms.advantages
        # The backward kernel scales row t's gradient vector by c_t (common.PerTokenLoss).
        per_token, coef = terms.per_token, terms.coef
        ctx.save_for_backward(student.data, teacher.data, student.offsets, teacher.offsets, target_ids, coef, out)
        ctx.strides = (student.stride, teacher.stride)
        ctx.cfg = cfg
        shape = target_ids.shape
        adv = adv.view(shape)
        ctx.mark_non_differentiable(out, adv)
        return per_token.view(shape), out, adv

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_token, _grad_out, _grad_adv):
        zs, zt, s_offs, t_offs, target_ids, coef, out = ctx.saved_tensors
        cfg = ctx.cfg
        student = Rows.from_parts(zs, ctx.strides[0], s_offs)
        teacher = Rows.from_parts(zt, ctx.strides[1], t_offs)
        c = (grad_per_token.reshape(-1).float() * coef).contiguous()
        grad = launch_loss_backward(
            student, teacher, target_ids, c, out, v=cfg["v"], temperature=cfg["options"].temperature,
            loss=cfg["loss"], inplace=cfg["inplace_backward"], block_v=cfg["block_v"],
        )
        return grad, None, None, None, None, None


def opd_loss_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    loss: str = "pg",
    old_logprobs: torch.Tensor | None = None,
    normalizer=None,
    options: StatsOptions | None = None,
    inplace_backward: bool = False,
    block_v: int | None = None,
    group: int | None = None,
    topk_impl: str = "auto",
    splits: int | str | None = None,
    **fields,
) -> OPDOutput:
    """The OPD loss of docs/formulas.md §5 with fused Triton forward statistics and a Triton backward.

    Same arguments and result as :func:`fastopd.reference.opd_loss`: ``pg`` l_t = -w_t sg(A_t) rho_t with
    rho_t = exp(s_t - sg(s_old_t)) and A_t = u_t - s_old_t; ``reverse_kl`` l_t = w_t KL_t (KL(p_S || p_T),
    ``stats.reverse_kl``); ``forward_kl`` l_t = w_t F_t (F_t = KL(p_T || p_S), ``stats.forward_kl``); loss =
    sum_t l_t / normaliser. The per-token loss and its gradient factor are
    :func:`fastopd.common.per_token_loss`'s, the reduction and metrics :func:`fastopd.common.reduce_loss`'s. The gradient w.r.t. the
    student logits is in their dtype (the sampled-token column p - 1 is formed in fp32); columns at or
    beyond ``vocab_size`` get 0; teacher logits, ``weights`` and ``old_logprobs`` get no gradient; the
    backward supports one differentiation (no double backward).

    ``options``: a :class:`fastopd.StatsOptions` (k, temperature, ignore_index, vocab_size), or its fields as
    keywords. Extra keywords (not in the reference):
        inplace_backward: write the gradient into the student-logits buffer itself and hand that buffer to
            autograd as the gradient, saving an N x V allocation (as Liger-Kernel does). Only legal when
            nothing else reads those logits after this loss's backward (no second loss, no reuse of the
            tensor, no other autograd node that saved it): its values are overwritten and autograd is not
            told (no version-counter bump). The forward results are unaffected.
        block_v, group, topk_impl, splits: tuning knobs of the kernels; keep the defaults
            (see :func:`fastopd.kernels.token_stats_triton`; ``splits`` picks the forward's split-V stats
            pass, :mod:`fastopd.kernels.token_stats_split`; the backward is unchanged).
    """
    opts = StatsOptions.of(options, **fields)
    v = check_token_inputs(student_logits, teacher_logits, target_ids, opts)
    check_loss_options(loss, weights, old_logprobs, target_ids)
    check_kernel_dtype("student_logits", student_logits)
    check_kernel_dtype("teacher_logits", teacher_logits)
    check_splits(splits)
    cfg = dict(
        options=opts, v=v, loss=loss, inplace_backward=bool(inplace_backward), block_v=block_v, group=group,
        topk_impl=topk_impl, splits=splits,
    )
    valid = target_ids != opts.ignore_index
    w = weight_mask(valid, weights, torch.float32)
    per_token, out, adv = _OPDLossFunction.apply(
        student_logits, teacher_logits.detach(), target_ids, w,
        None if old_logprobs is None else old_logprobs.detach(), cfg,
    )
    shape = target_ids.shape
    stats = TokenStats(
        student_logprobs=out[OUT_S.value].view(shape),
        teacher_logprobs=out[OUT_U.value].view(shape),
        advantages=adv,
        margins=out[OUT_MARGIN.value].view(shape),
        valid=valid,
    )
    if loss in DIVERGENCES:  # TokenStats.reverse_kl / .forward_kl: the divergence the loss used
        setattr(stats, loss, out[OUT_KL.value].view(shape))
    return reduce_loss(per_token, stats, w, loss, normalizer)
