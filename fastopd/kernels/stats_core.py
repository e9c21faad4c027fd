"""The per-row steps of the token-statistics pass (docs/formulas.md §1), shared by its two launches.

:mod:`fastopd.kernels.token_stats` (the single pass, one program per row) and
:mod:`fastopd.kernels.token_stats_split` (the split-V pass, per-(row, slice) programs and a merge) both run
these Triton functions, so each formula has one copy: :func:`_stats_chunk` (one chunk of a row: online
log-sum-exp, the KL accumulator, the streaming top-K group keys), :func:`_stats_ignored` (an ignored row's
outputs), :func:`_stats_tail` (candidates, margins, log-probs and KL from the merged state), and the launch
constants :func:`stats_launch_config`. The design notes are in :mod:`fastopd.kernels.token_stats`. Both passes
import this module; it imports neither.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastopd.kernels._helpers import (
    KL_FORWARD,
    KL_REVERSE,
    MAX_K_PAD,
    NUM_OUT,
    OUT_ADV,
    OUT_KL,
    OUT_LOGSUM_S,
    OUT_LOGSUM_T,
    OUT_MARGIN,
    OUT_MAX_S,
    OUT_MAX_T,
    OUT_S,
    OUT_U,
    SENTINEL,
    key_index,
    next_pow2,
    order_bits,
    pack_key,
    topk_keys,
)

LOG2E = 1.4426950408889634



@triton.jit
def _stats_chunk(
    zs_row, zt_row, start, V, tile, m_s, sum_s, m_t, sum_t, acc, run, scale2,
    MASKED: tl.constexpr, KL_KIND: tl.constexpr, K_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BITONIC: tl.constexpr,
):
    """One chunk of the streaming pass: update (M_S, sum_S, M_T, sum_T, acc, running top-K groups); ``acc`` is
    the accumulator of the divergence KL_KIND selects (module docstring), untouched for KL_NONE."""
    cols = start + tile
    if MASKED:
        inside = cols < V
        zs = tl.load(zs_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
        zt = tl.load(zt_row + cols, mask=inside, other=-float("inf")).to(tl.float32)
    else:
        zs = tl.load(zs_row + cols).to(tl.float32)
        zt = tl.load(zt_row + cols).to(tl.float32)

    # --- running top-K groups of the student ---
    gmax = tl.max(zs, axis=1)
    cmax_s = tl.max(gmax, axis=0)
    # A chunk can only enter the running set if its max beats the K-th group max (equal values lose: their
    # indices are higher).
    if order_bits(cmax_s).to(tl.int64) > (tl.min(run, axis=0) >> 32):
        gkey = pack_key(gmax, start // GROUP_SIZE + tl.arange(0, BLOCK_G))
        ctop = topk_keys(gkey, K_PAD, BITONIC)
        run = topk_keys(tl.reshape(tl.join(run, ctop), [2 * K_PAD]), K_PAD, BITONIC)

    # --- online log-sum-exp of both models (maxima in logit units, exp2 with log2(e)/tau) ---
    new_m_s = tl.maximum(m_s, cmax_s)
    new_m_t = tl.maximum(m_t, tl.max(zt))
    safe_old_s = tl.where(m_s == -float("inf"), 0.0, m_s)
    safe_old_t = tl.where(m_t == -float("inf"), 0.0, m_t)
    safe_s = tl.where(new_m_s == -float("inf"), 0.0, new_m_s)
    safe_t = tl.where(new_m_t == -float("inf"), 0.0, new_m_t)
    alpha_s = tl.exp2((m_s - safe_s) * scale2)
    alpha_t = tl.exp2((m_t - safe_t) * scale2)
    xs = (zs - safe_s) * scale2
    xt = (zt - safe_t) * scale2
    es = tl.exp2(xs)
    et = tl.exp2(xt)
    if KL_KIND == KL_REVERSE:
        # acc in log2 units: sum_v e_S(v) (xs_v - xt_v), rescaled when either maximum moves.
        terms = tl.where(es > 0.0, es * (xs - xt), 0.0)
        shift = (safe_s - safe_old_s) * scale2 - (safe_t - safe_old_t) * scale2
        acc = alpha_s * (acc - tl.where(sum_s > 0.0, shift * sum_s, 0.0)) + tl.sum(terms)
    elif KL_KIND == KL_FORWARD:
        # The reverse accumulator with S and T swapped: acc = sum_v e_T(v) (xt_v - xs_v), and when the maxima
        # move, acc <- alpha_T (acc + shift * sum_T). An old acc of +inf (a z_S = -inf under teacher mass)
        # whose weight alpha_T underflows to 0 contributes 0 (as p_T(v) = 0 does in the reference), not NaN.
        terms = tl.where(et > 0.0, et * (xt - xs), 0.0)
        shift = (safe_s - safe_old_s) * scale2 - (safe_t - safe_old_t) * scale2
        acc = tl.where(alpha_t > 0.0, alpha_t * (acc + tl.where(sum_t > 0.0, shift * sum_t, 0.0)), 0.0)
        acc = acc + tl.sum(terms)
    sum_s = sum_s * alpha_s + tl.sum(es)
    sum_t = sum_t * alpha_t + tl.sum(et)
    return new_m_s, sum_s, new_m_t, sum_t, acc, run


@triton.jit
def _stats_ignored(out_ptr, ids_ptr, row, N, k, j, RETURN_TOPK: tl.constexpr, K_PAD: tl.constexpr):
    """An ignored row (target == ignore_index): zeros in every output row, candidate ids -1
    (``j = tl.arange(0, K_PAD)``)."""
    for o in tl.static_range(NUM_OUT):
        tl.store(out_ptr + o * N + row, 0.0)
    if RETURN_TOPK:
        tl.store(ids_ptr + row * k + j, tl.full([K_PAD], -1, tl.int64), mask=j < k)  # -1: no candidate


@triton.jit
def _stats_tail(
    zs_row, zt_row, out_ptr, ids_ptr, row, y, run, m_s, sum_s, m_t, sum_t, acc, N, V, k, tau, inv_tau, j, lane,
    KL_KIND: tl.constexpr, RETURN_TOPK: tl.constexpr, K_PAD: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BITONIC: tl.constexpr,
):
    """The end of a row once its streaming state is final (shared by the single-pass kernel and the split
    pass's combine kernel, :mod:`fastopd.kernels.token_stats_split`): the K candidate groups ``run`` are read
    again and one top-K picks the K elements; the teacher is gathered at them (margin, with the tie and
    non-finite rules of the reference) and both models at the target y; the divergence from ``acc`` (reverse
    KL = ln2 acc / sum_S - log sum_S + log sum_T, forward KL = ln2 acc / sum_T - log sum_T + log sum_S); all
    NUM_OUT outputs of the row (and its ids with RETURN_TOPK) are stored. ``j = tl.arange(0, K_PAD)``,
    ``lane = tl.arange(0, GROUP_SIZE)[None, :]`` (made by the caller, where the single pass always made them,
    so that its compiled code is unchanged)."""
    # --- the row's top-K elements, from the K candidate groups (one re-read of K * GROUP columns) ---
    real = (run != SENTINEL)[:, None]
    ecols = tl.where(real, key_index(run)[:, None], 0) * GROUP_SIZE + lane
    emask = real & (ecols < V)
    ez = tl.load(zs_row + ecols, mask=emask, other=-float("inf")).to(tl.float32)
    ekey = tl.where(emask, pack_key(ez, ecols), SENTINEL)
    top = topk_keys(tl.reshape(ekey, [K_PAD * GROUP_SIZE]), K_PAD, BITONIC)

    log_s = tl.log(sum_s)
    log_t = tl.log(sum_t)
    zy_s = tl.load(zs_row + y).to(tl.float32)
    zy_t = tl.load(zt_row + y).to(tl.float32)
    s = (zy_s - m_s) * inv_tau - log_s
    u = (zy_t - m_t) * inv_tau - log_t

    # --- teacher margin over the student's top-k candidates ---
    ids = key_index(top)
    cand = j < k
    tz = tl.load(zt_row + ids, mask=cand, other=-float("inf")).to(tl.float32)
    a1 = tl.max(tz, axis=0)
    i1 = tl.argmax(tz, axis=0)
    a2 = tl.max(tl.where(j == i1, -float("inf"), tz), axis=0)
    margin = tl.where(a1 == a2, 0.0, (a1 - a2) / tau)
    # A row with a NaN or +inf logit, or no finite one, has no log-sum-exp: NaN margin, as the reference.
    finite = (tl.abs(log_s) < float("inf")) & (tl.abs(log_t) < float("inf"))
    margin = tl.where(finite, margin, float("nan"))

    kl = 0.0
    if KL_KIND == KL_REVERSE:
        kl = acc / sum_s * 0.6931471805599453 - log_s + log_t
    elif KL_KIND == KL_FORWARD:
        kl = acc / sum_t * 0.6931471805599453 - log_t + log_s

    tl.store(out_ptr + OUT_S * N + row, s)
    tl.store(out_ptr + OUT_U * N + row, u)
    tl.store(out_ptr + OUT_ADV * N + row, u - s)
    tl.store(out_ptr + OUT_MARGIN * N + row, margin)
    tl.store(out_ptr + OUT_KL * N + row, kl)
    tl.store(out_ptr + OUT_MAX_S * N + row, m_s)
    tl.store(out_ptr + OUT_LOGSUM_S * N + row, log_s)
    tl.store(out_ptr + OUT_MAX_T * N + row, m_t)
    tl.store(out_ptr + OUT_LOGSUM_T * N + row, log_t)
    if RETURN_TOPK:
        tl.store(ids_ptr + row * k + j, ids.to(tl.int64), mask=cand)


def stats_launch_config(v: int, k: int, block_v: int | None = None, group: int | None = None,
                        bitonic: bool = True) -> dict:
    """Constexprs and num_warps of the stats kernel.

    K_PAD = next power of two >= k. GROUP (columns per top-K group) = min(128, 4096 / K_PAD), at least 16,
    on the GPU path (128 for K_PAD <= 32: the per-chunk ``tl.topk`` then sorts only BLOCK_V / 128 group
    keys; registers per Triton version: docs/kernels.md), 16 under the interpreter (its O(n^2) selection runs
    over K_PAD * GROUP keys). BLOCK_V = 4096 by default, at least K_PAD * GROUP (a chunk must hold K_PAD
    groups), at most the next power of two >= V.
    """
    k_pad = max(2, next_pow2(k))
    if k_pad > MAX_K_PAD:
        raise ValueError(f"k must be <= {MAX_K_PAD} on the Triton backend, got k={k}; use backend='reference'")
    if group is None:
        group = max(16, min(128, 4096 // k_pad)) if bitonic else 16
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of two, got {group}")
    target = 4096 if block_v is None else int(block_v)
    block = max(min(next_pow2(max(v, 1)), next_pow2(target)), k_pad * group)
    num_warps = 4 if block >= 2048 else 2
    return dict(K_PAD=k_pad, BLOCK_G=block // group, GROUP_SIZE=group, BITONIC=bool(bitonic), num_warps=num_warps)
