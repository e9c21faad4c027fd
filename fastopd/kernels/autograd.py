"""``opd_loss_triton``: the OPD loss of DESIGN.md section 5 over the fused kernels, as an autograd Function.

Forward: the stats kernel (one streaming pass per row over both models), then O(N) arithmetic for the
per-token loss. Backward: the per-row gradient kernel of :mod:`fastopd.kernels.loss_backward`. Between the
two only O(N) fp32 tensors are kept (M_S, log Z_S, M_T, log Z_T, KL_t and the per-row factor c_t) plus
references to the logits themselves; no N x V softmax is ever stored.

The Function returns the *per-token* loss l_t, so both ``out.per_token`` and ``out.loss`` (their sum over
the normaliser) are differentiable, and any reduction a trainer applies to ``per_token`` works: the
gradient arriving at l_t scales row t of the backward kernel.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastopd._validate import check_token_inputs
from fastopd.kernels._helpers import Rows, check_kernel_dtype
from fastopd.kernels.loss_backward import launch_loss_backward
from fastopd.kernels.token_stats import (
    OUT_ADV,
    OUT_KL,
    OUT_LOGSUM_S,
    OUT_LOGSUM_T,
    OUT_MARGIN,
    OUT_MAX_S,
    OUT_MAX_T,
    OUT_S,
    OUT_U,
    launch_token_stats,
)
from fastopd.reference import check_loss_options, reduce_loss
from fastopd.types import OPDOutput, TokenStats


def loss_terms(out, valid, weights, old_logprobs, reverse_kl: bool):
    """Per-token loss, backward coefficient c_t, advantage and saved row statistics from the stats buffer.

    ``out`` is the (NUM_OUT, N) fp32 buffer of the stats kernel. ``pg``: l_t = -w A rho with
    rho = exp(s - s_old), A = u - s_old, c_t = w A rho (dl/dz = c_t (p - e_y) / tau, the kernel adds
    (p - e_y) / tau); ``reverse_kl``: l_t = w KL_t, c_t = w. ``weights=None`` means w = valid. Returns
    (per_token, coef, adv, stat) with ``stat`` the (5, N) rows [M_S, log Z_S, M_T, log Z_T, KL] the backward
    kernel reads. Used by :class:`_OPDLossFunction` and by the hidden-state path on each chunk.
    """
    zero = torch.zeros((), dtype=torch.float32, device=out.device)
    w = valid.float() if weights is None else torch.where(valid, weights.reshape(-1).float(), zero)
    if reverse_kl:
        adv = out[OUT_ADV].clone()
        per_token = torch.where(valid, w * out[OUT_KL], zero)
        coef = torch.where(valid, w, zero)
    else:
        s = out[OUT_S]
        s_old = s if old_logprobs is None else old_logprobs.reshape(-1).float()
        adv = torch.where(valid, out[OUT_U] - s_old, zero)
        rho = torch.exp(torch.where(valid, s - s_old, zero))
        # l = -w A rho  =>  dl/dz = w A rho (p - e_y) / tau  (the kernel adds (p - e_y) / tau).
        coef = torch.where(valid, w * adv * rho, zero)
        per_token = torch.where(valid, -coef, zero)
    stat = out[[OUT_MAX_S, OUT_LOGSUM_S, OUT_MAX_T, OUT_LOGSUM_T, OUT_KL]].contiguous()
    return per_token, coef, adv, stat


class _OPDLossFunction(torch.autograd.Function):
    """per_token = l_t(z_S) with a kernel backward; teacher logits, weights and old log-probs get no gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, target_ids, weights, old_logprobs, cfg):
        student, teacher = Rows(student_logits), Rows(teacher_logits)
        reverse_kl = cfg["loss"] == "reverse_kl"
        out, _ = launch_token_stats(
            student, teacher, target_ids, v=cfg["v"], k=cfg["k"], temperature=cfg["temperature"],
            ignore_index=cfg["ignore_index"], full_kl=reverse_kl, return_topk=False,
            block_v=cfg["block_v"], group=cfg["group"], topk_impl=cfg["topk_impl"],
        )
        valid = (target_ids != cfg["ignore_index"]).reshape(-1)
        per_token, coef, adv, stat = loss_terms(out, valid, weights, old_logprobs, reverse_kl)
        ctx.save_for_backward(student.data, teacher.data, student.offsets, teacher.offsets, target_ids, coef, stat)
        ctx.strides = (student.stride, teacher.stride)
        ctx.cfg = cfg
        shape = target_ids.shape
        adv = adv.view(shape)
        ctx.mark_non_differentiable(out, adv)
        return per_token.view(shape), out, adv

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_token, _grad_out, _grad_adv):
        zs, zt, s_offs, t_offs, target_ids, coef, stat = ctx.saved_tensors
        cfg = ctx.cfg
        student = Rows.from_parts(zs, ctx.strides[0], s_offs)
        teacher = Rows.from_parts(zt, ctx.strides[1], t_offs)
        c = (grad_per_token.reshape(-1).float() * coef).contiguous()
        grad = launch_loss_backward(
            student, teacher, target_ids, c, stat, v=cfg["v"], temperature=cfg["temperature"],
            reverse_kl=cfg["loss"] == "reverse_kl", inplace=cfg["inplace_backward"], block_v=cfg["block_v"],
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
    k: int = 16,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
    block_v: int | None = None,
    group: int | None = None,
    topk_impl: str = "auto",
) -> OPDOutput:
    """The OPD loss of DESIGN.md section 5 with fused Triton forward statistics and a Triton backward.

    Same arguments and result as :func:`fastopd.reference.opd_loss`: ``pg`` l_t = -w_t sg(A_t) rho_t with
    rho_t = exp(s_t - sg(s_old_t)) and A_t = u_t - s_old_t; ``reverse_kl`` l_t = w_t KL_t; loss = sum_t l_t /
    normaliser. The reduction and metrics are :func:`fastopd.reference.reduce_loss`'s. The gradient w.r.t. the
    student logits is in their dtype (the sampled-token column p - 1 is formed in fp32); columns at or
    beyond ``vocab_size`` get 0; teacher logits, ``weights`` and ``old_logprobs`` get no gradient; the
    backward supports one differentiation (no double backward).

    Extra keywords (not in the reference):
        inplace_backward: write the gradient into the student-logits buffer itself and hand that buffer to
            autograd as the gradient, saving an N x V allocation (as Liger-Kernel does). Only legal when
            nothing else reads those logits after this loss's backward (no second loss, no reuse of the
            tensor, no other autograd node that saved it): its values are overwritten and autograd is not
            told (no version-counter bump). The forward results are unaffected.
        block_v, group, topk_impl: tuning knobs of the kernels; keep the defaults
            (see :func:`fastopd.kernels.token_stats_triton`).
    """
    v = check_token_inputs(
        student_logits, teacher_logits, target_ids,
        k=k, temperature=temperature, ignore_index=ignore_index, vocab_size=vocab_size,
    )
    check_loss_options(loss, weights, old_logprobs, target_ids)
    check_kernel_dtype("student_logits", student_logits)
    check_kernel_dtype("teacher_logits", teacher_logits)
    cfg = dict(
        v=v, k=k, temperature=float(temperature), ignore_index=ignore_index, loss=loss,
        inplace_backward=bool(inplace_backward), block_v=block_v, group=group, topk_impl=topk_impl,
    )
    per_token, out, adv = _OPDLossFunction.apply(
        student_logits, teacher_logits.detach(), target_ids,
        None if weights is None else weights.detach(),
        None if old_logprobs is None else old_logprobs.detach(), cfg,
    )
    shape = target_ids.shape
    valid = target_ids != ignore_index
    stats = TokenStats(
        student_logprobs=out[OUT_S].view(shape),
        teacher_logprobs=out[OUT_U].view(shape),
        advantages=adv,
        margins=out[OUT_MARGIN].view(shape),
        valid=valid,
    )
    if loss == "reverse_kl":
        stats.reverse_kl = out[OUT_KL].view(shape)
    zero = torch.zeros((), dtype=torch.float32, device=valid.device)
    w = valid.float() if weights is None else torch.where(valid, weights.float(), zero)
    return reduce_loss(per_token, stats, w, loss, normalizer)
