"""Backward kernel of the OPD loss: dloss/dz_S written in one streaming pass per row (docs/formulas.md §5).

Row t gets a per-row coefficient c_t (the incoming gradient of the per-token loss times the loss's own
factor, computed by :mod:`fastopd.kernels.autograd`) and the saved O(N) statistics of the forward pass:
the student's running max M_S and log-sum log Z_S (and the teacher's M_T, log Z_T, and KL_t for the reverse
KL). With log p_S(v) = (z_S(v) - M_S) / tau - log Z_S and log p_T(v) = (z_T(v) - M_T) / tau - log Z_T:

- ``pg``:         dz_S(v) = c_t * (p_S(v) - [v == y_t]) / tau,            c_t = g_t * w_t * A_t * rho_t
- ``reverse_kl``: dz_S(v) = c_t * p_S(v) * (log p_S(v) - log p_T(v) - KL_t) / tau,   c_t = g_t * w_t
- ``forward_kl``: dz_S(v) = c_t * (p_S(v) - p_T(v)) / tau,                c_t = g_t * w_t

The constexpr KL_KIND picks the branch (0 ``pg``, 1 ``reverse_kl``, 2 ``forward_kl``; ``_helpers.KL_*``).

(∂(-w A rho)/∂z = -w A rho (e_y - p) / tau = w A rho (p - e_y) / tau.) Everything is fp32 until the single
cast to the logits' dtype at the store, so the sampled-token column p - 1 is formed in fp32, not in bf16.
Columns in [V, W) of a student buffer wider than ``vocab_size`` get exactly 0, and rows with c_t == 0
(ignored tokens, or tokens a release rule dropped) write zeros without reading the logits.

Launch configuration (:func:`backward_launch_config`): BLOCK = 4096, num_warps = 8 (registers per Triton
version: docs/kernels.md); full chunks run without masks so the loads and stores vectorise whatever V is, and
one masked tail loop covers [V_full, W). Traffic is one read of the student row (plus one of the teacher row
for ``reverse_kl`` and ``forward_kl``) and one write of the gradient row; with the forward's two reads, the loss
costs 4 (pg) or 5 (reverse_kl, forward_kl) passes over N x V elements. With
``inplace`` the gradient row overwrites the student row it was computed from (each program reads a chunk
before writing the same chunk), so no N x V gradient buffer is allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastopd.kernels._helpers import (
    KL_FORWARD,
    KL_REVERSE,
    OUT_KL,
    OUT_LOGSUM_S,
    OUT_LOGSUM_T,
    OUT_MAX_S,
    OUT_MAX_T,
    Rows,
    is_interpreted,
    kl_kind,
    loss_kl,
    next_pow2,
    row_base,
)

@triton.jit
def _backward_chunk(
    zs_row, zt_row, g_row, cols, V, W, y, m_s, log_s, m_t, log_t, kl, scale, inv_tau,
    MASKED: tl.constexpr, KL_KIND: tl.constexpr,
):
    """Gradient of one chunk of columns (unmasked chunks lie inside [0, V) and so inside [0, W))."""
    if MASKED:
        inside = cols < V
        zs = tl.load(zs_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
    else:
        zs = tl.load(zs_row + cols).to(tl.float32)
    ls = (zs - m_s) * inv_tau - log_s
    p = tl.exp(ls)
    if KL_KIND == KL_REVERSE:
        if MASKED:
            zt = tl.load(zt_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
        else:
            zt = tl.load(zt_row + cols).to(tl.float32)
        lt = (zt - m_t) * inv_tau - log_t
        g = tl.where(p > 0.0, p * ((ls - lt) - kl), 0.0)
    elif KL_KIND == KL_FORWARD:
        if MASKED:
            zt = tl.load(zt_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
        else:
            zt = tl.load(zt_row + cols).to(tl.float32)
        g = p - tl.exp((zt - m_t) * inv_tau - log_t)
    else:
        g = tl.where(cols == y, p - 1.0, p)
    g = g * scale
    if MASKED:
        tl.store(g_row + cols, tl.where(inside, g, 0.0).to(g_row.dtype.element_ty), mask=cols < W)
    else:
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty))


@triton.jit(do_not_specialize=["N"])
def _loss_backward_kernel(
    zs_ptr, zt_ptr, grad_ptr, tgt_ptr, coef_ptr, stat_ptr,
    s_stride, t_stride, g_stride, s_offs_ptr, t_offs_ptr, g_offs_ptr,
    N, V, W, inv_tau,
    S_OFFS: tl.constexpr, T_OFFS: tl.constexpr, G_OFFS: tl.constexpr,
    KL_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    g_row = grad_ptr + row_base(row, g_stride, g_offs_ptr, G_OFFS)
    offs = tl.arange(0, BLOCK)
    # While loops, not range(): the interpreter of Triton < 3.8 turns a runtime range bound into an int with
    # int(ndarray of shape (1,)), which NumPy >= 2.4 rejects (docs/kernels.md, "Triton versions").
    if coef == 0.0:
        start = 0
        while start < W:
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(grad_ptr.dtype.element_ty), mask=cols < W)
            start += BLOCK
        return

    zs_row = zs_ptr + row_base(row, s_stride, s_offs_ptr, S_OFFS)
    zt_row = zt_ptr + row_base(row, t_stride, t_offs_ptr, T_OFFS)
    m_s = tl.load(stat_ptr + OUT_MAX_S * N + row)
    log_s = tl.load(stat_ptr + OUT_LOGSUM_S * N + row)
    m_t = tl.load(stat_ptr + OUT_MAX_T * N + row)
    log_t = tl.load(stat_ptr + OUT_LOGSUM_T * N + row)
    kl = tl.load(stat_ptr + OUT_KL * N + row)
    y = tl.load(tgt_ptr + row).to(tl.int32)
    scale = coef * inv_tau
    # Full chunks without masks (vectorised loads and stores whatever V is), then the masked tail up to W.
    v_full = (V // BLOCK) * BLOCK
    start = 0
    while start < v_full:
        _backward_chunk(zs_row, zt_row, g_row, start + offs, V, W, y, m_s, log_s, m_t, log_t, kl, scale,
                        inv_tau, False, KL_KIND)
        start += BLOCK
    while start < W:
        _backward_chunk(zs_row, zt_row, g_row, start + offs, V, W, y, m_s, log_s, m_t, log_t, kl, scale,
                        inv_tau, True, KL_KIND)
        start += BLOCK


def backward_launch_config(width: int, block_v: int | None = None) -> dict:
    target = 4096 if block_v is None else int(block_v)
    block = max(16, min(next_pow2(max(width, 1)), next_pow2(target)))
    return dict(BLOCK=block, num_warps=8 if block >= 4096 else (4 if block >= 1024 else 2))


def launch_loss_backward(
    student: Rows,
    teacher: Rows,
    target_ids: torch.Tensor,
    coef: torch.Tensor,
    stat: torch.Tensor,
    *,
    v: int,
    temperature: float,
    loss: str,
    inplace: bool,
    block_v: int | None = None,
) -> torch.Tensor:
    """dloss/dz_S for every row, shaped like the student logits, in their dtype.

    ``loss`` is ``"pg"``, ``"reverse_kl"`` or ``"forward_kl"`` (the branch of the module docstring), ``coef``
    the fp32 (N,) c_t, ``stat`` the stats kernel's fp32 (NUM_OUT, N) buffer, of which the rows OUT_MAX_S,
    OUT_LOGSUM_S, OUT_MAX_T, OUT_LOGSUM_T and OUT_KL are read (for ``reverse_kl``, OUT_KL must hold the
    reverse KL). With ``inplace`` the result is written into (and returned as) ``student.data``.
    """
    kind = kl_kind(loss_kl(loss))
    x = student.data
    # The interpreter's fp32 -> bf16 cast truncates (on the GPU it is cvt.rn, round to nearest even): under
    # the interpreter a bf16 gradient is staged in fp32 and rounded by torch. Interpreter-only, for exactness.
    staged = x.dtype == torch.bfloat16 and is_interpreted(_loss_backward_kernel)
    if inplace and not staged:
        grad, g_rows = x, student
    else:
        grad = torch.empty(x.shape, dtype=torch.float32 if staged else x.dtype, device=x.device)
        g_rows = Rows(grad)
    n = student.n
    if n > 0 and x.shape[-1] > 0:
        cfg = backward_launch_config(student.width, block_v)
        _loss_backward_kernel[(n,)](
            x, teacher.data, grad, target_ids.reshape(-1), coef, stat,
            student.stride, teacher.stride, g_rows.stride,
            student.offsets_arg(), teacher.offsets_arg(), g_rows.offsets_arg(),
            n, v, student.width, 1.0 / float(temperature),
            S_OFFS=student.use_offsets, T_OFFS=teacher.use_offsets, G_OFFS=g_rows.use_offsets,
            KL_KIND=kind, **cfg,
        )
    if staged:
        if inplace:
            x.copy_(grad)
            return x
        return grad.to(x.dtype)
    return grad
