"""Fused token-statistics kernel (docs/formulas.md §1) and per-segment margin sums (section 2).

One program per row streams the student row and the teacher row *together*, once each, in chunks of
``BLOCK_V = BLOCK_G * GROUP`` columns loaded as a (BLOCK_G, GROUP) tile of each. Per chunk, in fp32:

- online log-sum-exp of z_S / tau and z_T / tau. The running maxima M are kept in raw logit units (exact)
  and the exponentials are ``exp2((z - M) * log2(e) / tau)``, so log p(y) = (z_y - M) / tau - log(sum) keeps
  full precision even for logits of magnitude 1e4 (a base-2 running max would cost ~1e-3 there);
- streaming top-K of the student logits, ties to the lower index, on packed int64 keys (``_helpers``). The
  loop keeps the top-K *groups* of GROUP consecutive columns, keyed by (group max, lower group index): the
  row's top-K elements all lie in those K groups (any element outside them is beaten by the K group maxima,
  by value or, on equal values, by index, because groups are contiguous index ranges). Per chunk that is one
  ``tl.topk`` over BLOCK_G group keys and one over 2K keys, and it is skipped outright when the chunk max
  does not beat the running K-th group max (equal values lose: their indices are higher). After the loop
  the K candidate groups (K * GROUP columns, 2 KB for K = 16 in bf16) are read again and one ``tl.topk``
  picks the K elements. Then the teacher is gathered at those K ids (a1, a2 and m_t = (a1 - a2) / tau, or
  0 when a1 == a2, or NaN when either row's log-sum-exp is not finite, exactly as the reference) and both
  models at the sampled token;
- optionally the exact reverse KL, online with both rescalings: with x = (z - M) * log2(e) / tau relative to
  the *current* maxima and e = 2^x_S, the kernel keeps acc = sum_v e_v (x_S(v) - x_T(v)); when the maxima
  move (shift = dx_S - dx_T) it becomes alpha_S * (acc - shift * sum_S). At the end
  KL = ln2 * acc / sum_S - log sum_S + log sum_T (= E_pS[z_S / tau - z_T / tau] - lse_S + lse_T with every
  magnitude centred on the maxima, so no cancellation of large lse values). Terms with p_S(v) = 0
  contribute 0 as in the reference; a finite p_S(v) against z_T(v) = -inf gives +inf.
- or, for the ``forward_kl`` loss, the exact forward KL F = KL(p_T || p_S): the same accumulator with the
  roles of S and T swapped, acc = sum_v e_T(v) (x_T(v) - x_S(v)) with e_T = 2^x_T. When the maxima move by
  dS = (M_S' - M_S) c and dT = (M_T' - M_T) c (c = log2(e) / tau), x_S(v) loses dS, x_T(v) loses dT and
  e_T(v) is multiplied by alpha_T = 2^-dT, so acc' = alpha_T (acc + shift * sum_T) with the *same*
  shift = dS - dT as the reverse rule, plus the chunk's terms where(e_T > 0, e_T (x_T - x_S), 0). At the end
  F = ln2 * acc / sum_T - log sum_T + log sum_S (log p_T = x_T ln2 - log sum_T, log p_S = x_S ln2 - log sum_S).
  Terms with p_T(v) = 0 contribute 0; a finite p_T(v) against z_S(v) = -inf gives +inf. One guard the
  reverse rule does not have: an acc of +inf whose weight alpha_T later underflows to 0 (the teacher's
  maximum rose by more than ~100 tau nats: that p_T(v) is 0 in fp32 and in fp64 alike) becomes 0, not
  0 * inf = NaN. The constexpr KL_KIND selects the accumulator: 0 none, 1 reverse (``full_kl=True``),
  2 forward (``launch_token_stats(kl="forward")``; ``_helpers.KL_NONE / KL_REVERSE / KL_FORWARD``); both
  KLs go to the same output row OUT_KL.

Rows whose target is ``ignore_index`` write zeros (candidate ids -1) and exit before reading any logits.
Besides the TokenStats fields the kernel writes M_S, log sum_S, M_T, log sum_T per row (O(N)): the loss
backward needs them.

Launch configuration (:func:`stats_launch_config`): BLOCK_V = 4096 columns per chunk, num_warps = 4, and
GROUP = 128 columns per top-K group for K_PAD <= 32, so the per-chunk ``tl.topk`` sorts 32 group keys (16 under
the interpreter, whose selection is O(n^2)). Every element of both rows is read exactly once
(2 * N * V * itemsize bytes: the bandwidth bound); extra traffic is the K * GROUP columns of the candidate
groups (4 KB per row for K = 16 in bf16) and K + 2 scalars per row; temporaries are O(N).
``python -m fastopd.kernels._aot --check`` (run by the tests) fails on a register spill in a hot variant.
Registers per Triton version (GROUP = 64 and 128) and GPU timings of other launch configurations:
docs/kernels.md and benchmarks/results/gpu/. Rows whose start is not 16-element aligned (a row stride such
as V = 50257) lose load vectorisation (more registers); the caller can pad the vocabulary to a multiple of 16.

``splits`` (default: the single pass here) selects the opt-in split-V pass of
:mod:`fastopd.kernels.token_stats_split`, which streams V-slices of a row in parallel and merges them exactly;
both end in :func:`_stats_tail`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastopd._validate import check_token_inputs
from fastopd.kernels._helpers import (
    NUM_OUT,
    OUT_ADV,
    OUT_KL,
    OUT_MARGIN,
    OUT_S,
    OUT_U,
    SENTINEL,
    Rows,
    check_kernel_dtype,
    check_triton,
    kl_kind,
    row_base,
    use_bitonic,
)
from fastopd.kernels.stats_core import (  # noqa: F401  (LOG2E, stats_launch_config: re-exported for callers)
    LOG2E,
    _stats_chunk,
    _stats_ignored,
    _stats_tail,
    stats_launch_config,
)
from fastopd.kernels import token_stats_split as split  # the split-V pass, looked up at each launch
from fastopd.kernels.token_stats_split import check_splits
from fastopd.options import StatsOptions
from fastopd.types import TokenStats


@triton.jit(do_not_specialize=["N", "k", "ignore_index"])
def _token_stats_kernel(
    zs_ptr, zt_ptr, tgt_ptr, out_ptr, ids_ptr,
    s_stride, t_stride, s_offs_ptr, t_offs_ptr,
    N, V, k, ignore_index, tau, inv_tau, scale2,
    S_OFFS: tl.constexpr, T_OFFS: tl.constexpr,
    KL_KIND: tl.constexpr, RETURN_TOPK: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_SIZE: tl.constexpr, BITONIC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(tgt_ptr + row).to(tl.int64)
    j = tl.arange(0, K_PAD)
    if y == ignore_index:
        _stats_ignored(out_ptr, ids_ptr, row, N, k, j, RETURN_TOPK, K_PAD)
        return

    zs_row = zs_ptr + row_base(row, s_stride, s_offs_ptr, S_OFFS)
    zt_row = zt_ptr + row_base(row, t_stride, t_offs_ptr, T_OFFS)
    BLOCK: tl.constexpr = BLOCK_G * GROUP_SIZE
    tile = tl.arange(0, BLOCK_G)[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]
    lane = tl.arange(0, GROUP_SIZE)[None, :]

    m_s = -float("inf")
    sum_s = 0.0
    m_t = -float("inf")
    sum_t = 0.0
    acc = 0.0
    # Running top-K of *groups* (key = group max, lower group index first): the row's top-K elements lie in
    # them, so elements are resolved once, after the loop.
    run = tl.full([K_PAD], SENTINEL, tl.int64)
    # Full chunks without a mask (so that the loads vectorise whatever V is), then one masked tail chunk.
    # A while loop, not range(): the interpreter of Triton < 3.8 turns a runtime range bound into an int with
    # int(ndarray of shape (1,)), which NumPy >= 2.4 rejects (docs/kernels.md, "Triton versions").
    v_full = (V // BLOCK) * BLOCK
    start = 0
    while start < v_full:
        m_s, sum_s, m_t, sum_t, acc, run = _stats_chunk(
            zs_row, zt_row, start, V, tile, m_s, sum_s, m_t, sum_t, acc, run, scale2,
            False, KL_KIND, K_PAD, BLOCK_G, GROUP_SIZE, BITONIC,
        )
        start += BLOCK
    if v_full < V:
        m_s, sum_s, m_t, sum_t, acc, run = _stats_chunk(
            zs_row, zt_row, v_full, V, tile, m_s, sum_s, m_t, sum_t, acc, run, scale2,
            True, KL_KIND, K_PAD, BLOCK_G, GROUP_SIZE, BITONIC,
        )

    _stats_tail(
        zs_row, zt_row, out_ptr, ids_ptr, row, y, run, m_s, sum_s, m_t, sum_t, acc, N, V, k, tau, inv_tau, j, lane,
        KL_KIND, RETURN_TOPK, K_PAD, GROUP_SIZE, BITONIC,
    )


def launch_token_stats(
    student: Rows,
    teacher: Rows,
    target_ids: torch.Tensor,
    options: StatsOptions | None = None,
    *,
    v: int,
    full_kl: bool = False,
    return_topk: bool,
    block_v: int | None = None,
    group: int | None = None,
    topk_impl: str = "auto",
    splits: int | str | None = None,
    kl: str | None = None,
    **fields,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the stats kernel on already validated rows; returns the (NUM_OUT, N) fp32 buffer and the ids.

    ``options``: the call's :class:`fastopd.StatsOptions` (k, temperature, ignore_index are read; ``v`` is the
    vocabulary already resolved), or its fields as keywords.

    The divergence written to row OUT_KL (0 without one): ``kl`` None, ``"reverse"`` (KL(p_S || p_T), what
    ``full_kl=True`` asks for: the public flag and the ``reverse_kl`` loss) or ``"forward"`` (KL(p_T || p_S),
    the ``forward_kl`` loss; internal). ``full_kl=True`` with ``kl="forward"`` is a ValueError.

    ``splits``: None (``FASTOPD_STATS_SPLITS`` if set, else 1), 1 (this module's single-pass kernel), an int
    >= 2 or ``"auto"`` (the split-V pass of :mod:`fastopd.kernels.token_stats_split`, same outputs;
    :func:`fastopd.kernels.token_stats_split.resolve_splits` clamps it, and a result of 1 is the single pass).
    """
    opts = StatsOptions.of(options, **fields)
    k, temperature, ignore_index = opts.k, opts.temperature, opts.ignore_index
    check_splits(splits)
    if full_kl and kl not in (None, "reverse"):
        raise ValueError(f"full_kl=True is the reverse KL; it cannot be combined with kl={kl!r}")
    kind = kl_kind("reverse" if full_kl and kl is None else kl)
    check_triton()
    n = student.n
    device = student.data.device
    out = torch.empty((NUM_OUT.value, n), dtype=torch.float32, device=device)
    ids = torch.empty((n, k), dtype=torch.int64, device=device) if return_topk else None
    if n == 0:
        return out, ids
    tgt = target_ids.reshape(-1)
    cfg = stats_launch_config(v, k, block_v, group, use_bitonic(_token_stats_kernel, topk_impl))
    n_split = split.resolve_splits(splits, n, v, cfg["K_PAD"], cfg["BLOCK_G"] * cfg["GROUP_SIZE"], device)
    if n_split > 1:
        split.launch_token_stats_split(
            student, teacher, target_ids, out, ids, splits=n_split, v=v, k=k, temperature=temperature,
            ignore_index=ignore_index, kind=kind, return_topk=return_topk, cfg=cfg,
        )
        return out, ids
    tau = float(temperature)
    _token_stats_kernel[(n,)](
        student.data, teacher.data, tgt, out, ids if ids is not None else out,
        student.stride, teacher.stride, student.offsets_arg(), teacher.offsets_arg(),
        n, v, k, ignore_index, tau, 1.0 / tau, LOG2E / tau,
        S_OFFS=student.use_offsets, T_OFFS=teacher.use_offsets,
        KL_KIND=kind, RETURN_TOPK=bool(return_topk), **cfg,
    )
    return out, ids


def token_stats_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    options: StatsOptions | None = None,
    full_kl: bool = False,
    return_topk: bool = False,
    block_v: int | None = None,
    group: int | None = None,
    topk_impl: str = "auto",
    splits: int | str | None = None,
    **fields,
) -> TokenStats:
    """Per-token statistics of docs/formulas.md §1 by one fused streaming pass per row (no N x V temporary).

    Same arguments and result as :func:`fastopd.reference.token_stats` (s_t, u_t, A_t = u_t - s_t, the margin
    m_t = (z_T[a1] - z_T[a2]) / tau over the student's top-k candidates with ties to the lower index, and
    optionally the exact reverse KL_t and the candidate ids), as float32 tensors shaped like ``target_ids``,
    0 where ``target_ids == ignore_index`` (candidate ids -1 there).

    Inputs: fp16/bf16/fp32 logits of shape (..., W); leading dims may be any strided view (no copy); the last
    dim must have stride 1 or is copied once. With ``vocab_size`` only the first V columns are read and the
    two widths may differ. Tuning knobs (keep the defaults): ``block_v`` the chunk width (rounded to a power
    of two, default 4096), ``group`` the columns per top-K group (see :func:`stats_launch_config`),
    ``topk_impl`` ``"auto"`` (``tl.topk`` when compiled, a rank-based selection under the interpreter),
    ``"bitonic"`` or ``"select"``; ``splits`` None (the default: ``FASTOPD_STATS_SPLITS`` if set, else
    1 = this single pass), an int >= 2 or ``"auto"`` (the split-V pass: each row cut into that many V-slices,
    clamped to its chunks; :mod:`fastopd.kernels.token_stats_split`, docs/kernels.md). Equal ids and
    margins either way; log-probs and KL to fp32 rounding. ``options``: a :class:`fastopd.StatsOptions`
    (k, temperature, ignore_index, vocab_size), or its fields as keywords.
    """
    opts = StatsOptions.of(options, **fields)
    check_splits(splits)
    v = check_token_inputs(student_logits, teacher_logits, target_ids, opts)
    check_kernel_dtype("student_logits", student_logits)
    check_kernel_dtype("teacher_logits", teacher_logits)
    with torch.no_grad():
        student, teacher = Rows(student_logits.detach()), Rows(teacher_logits.detach())
        out, ids = launch_token_stats(
            student, teacher, target_ids, opts, v=v, full_kl=full_kl, return_topk=return_topk, block_v=block_v,
            group=group, topk_impl=topk_impl, splits=splits,
        )
    shape = target_ids.shape
    stats = TokenStats(
        student_logprobs=out[OUT_S.value].view(shape),
        teacher_logprobs=out[OUT_U.value].view(shape),
        advantages=out[OUT_ADV.value].view(shape),
        margins=out[OUT_MARGIN.value].view(shape),
        valid=target_ids != opts.ignore_index,
    )
    if full_kl:
        stats.reverse_kl = out[OUT_KL.value].view(shape)
    if return_topk:
        stats.topk_ids = ids.view(*shape, opts.k)
    return stats


# ----------------------------------------------------------------------------------------------------------
# Per-(rollout, segment) sums and counts of a per-token value (the numerators of docs/formulas.md §2's x_j)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _segment_sums_kernel(val_ptr, seg_ptr, ok_ptr, sums_ptr, counts_ptr, n_tokens, L, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_tokens
    val = tl.load(val_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    seg = tl.load(seg_ptr + offs, mask=inside, other=-1).to(tl.int64)
    ok = tl.load(ok_ptr + offs, mask=inside, other=0) != 0
    keep = inside & ok & (seg >= 0) & (seg < S)
    dst = (offs // L) * S + seg
    tl.atomic_add(sums_ptr + dst, val, mask=keep)
    tl.atomic_add(counts_ptr + dst, tl.full([BLOCK], 1, tl.int32), mask=keep)


def segment_sums_triton(
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    valid: torch.Tensor,
    num_segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(rollout, segment) sums and counts of ``values`` over valid tokens, by atomics (docs/formulas.md §2).

    x_j = sums[b, j] / counts[b, j] is the segment mean of :func:`fastopd.reference.segment_means` (which drops
    the segments with counts 0). Float atomics make the sums' last bits depend on the scheduling order.

    Args:
        values: (B, L) per-token values (e.g. ``TokenStats.margins``), any float dtype.
        segment_ids: (B, L) integer segment ids; negative ids (padding) are skipped.
        valid: (B, L) bool; only valid tokens are counted.
        num_segments: S, the width of the result; default ``max(segment_ids[valid]) + 1``. A valid id >= S
            is an error.

    Returns:
        ``(sums, counts)``: float32 (B, S) and int32 (B, S).
    """
    check_triton()
    for name, t in (("values", values), ("segment_ids", segment_ids), ("valid", valid)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a (B, L) torch.Tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if segment_ids.shape != values.shape or valid.shape != values.shape:
        raise ValueError(
            f"values, segment_ids and valid must share one (B, L) shape, got {tuple(values.shape)}, "
            f"{tuple(segment_ids.shape)}, {tuple(valid.shape)}"
        )
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    b, length = values.shape
    ok = valid.to(device=values.device, dtype=torch.bool) & (segment_ids >= 0)
    seg_max = int(segment_ids[ok].max()) if bool(ok.any()) else -1
    if num_segments is None:
        num_segments = max(seg_max + 1, 1)
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be a positive int or None, got {num_segments!r}")
    if seg_max >= num_segments:
        raise ValueError(f"segment_ids has a valid id {seg_max} >= num_segments={num_segments}")
    sums = torch.zeros((b, num_segments), dtype=torch.float32, device=values.device)
    counts = torch.zeros((b, num_segments), dtype=torch.int32, device=values.device)
    n = b * length
    if n == 0:
        return sums, counts
    block = 1024
    _segment_sums_kernel[(triton.cdiv(n, block),)](
        values.contiguous(), segment_ids.contiguous(), ok.to(torch.int8).contiguous(), sums, counts,
        n, length, num_segments, BLOCK=block,
    )
    return sums, counts


__all__ = ["token_stats_triton", "segment_sums_triton", "launch_token_stats", "stats_launch_config"]
