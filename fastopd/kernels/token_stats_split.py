"""Split-V token statistics: the stats pass of :mod:`fastopd.kernels.token_stats` in two phases (formulas §1).

The single-pass kernel gives each row one program, which streams the student and teacher rows chunk after
chunk: at small N there are too few programs to keep enough bytes in flight. The split pass (in the style
of apple/ml-cross-entropy, one small file per kernel phase) cuts every row into SPLITS contiguous V-slices:

**Phase 1** (:func:`_stats_split_kernel`, grid (N, SPLITS)). Program (r, i) streams the chunks
``[i * C // SPLITS, (i + 1) * C // SPLITS)`` of row r (C = ceil(V / BLOCK_V) chunks; every slice holds at
least one chunk; the last slice holds the masked tail, and streams it first) with the same per-chunk step
as the single pass (``_stats_chunk`` of :mod:`fastopd.kernels.stats_core`, shared, not copied), and writes its partial state: M_S,i, sum_S,i,
M_T,i, sum_T,i, the KL accumulator acc_i (KL_KIND 1 reverse or 2 forward, as the single pass) and its K_PAD
running top-K group keys (int64 packed keys,
as ``run``; group indices are global). Rows whose target is ``ignore_index`` exit before reading any logits and write nothing.

**Phase 2** (:func:`_stats_combine_kernel`, one program per row) merges the SPLITS partials exactly, then
runs the single pass's tail (``_stats_tail``, shared: one copy of the formulas). With c = log2(e) / tau and
"safe" maxima (a maximum of -inf counts as 0, as in the streaming code; maxima stay in logit units):

- log-sum-exp: M = max_i M_i; alpha_i = 2^((M_i - M) c) (0 for a slice whose maximum is -inf);
  sum = sum_i alpha_i sum_i, for the student and the teacher alike.
- the KL accumulator. Slice i kept acc_i = sum_v e_i(v) (x_S,i(v) - x_T,i(v)) with x_S,i(v) = (z_S(v) - M_S,i) c,
  x_T,i(v) = (z_T(v) - M_T,i) c and e_i(v) = 2^x_S,i(v). Relative to the row maxima, x_S(v) = x_S,i(v) -
  (M_S - M_S,i) c, x_T(v) = x_T,i(v) - (M_T - M_T,i) c and e(v) = alpha_S,i e_i(v), so
  acc = sum_i alpha_S,i (acc_i - shift_i sum_S,i) with shift_i = (M_S - M_S,i) c - (M_T - M_T,i) c:
  the single pass's rescaling rule with the row maxima as "new" and the slice's as "old" (the term
  shift_i sum_S,i is taken as 0 when sum_S,i = 0, as there). KL = ln2 acc / sum_S - log sum_S + log sum_T.
- the forward-KL accumulator (KL_KIND 2) by symmetry: slice i kept acc_i = sum_v e_T,i(v) (x_T,i(v) - x_S,i(v))
  with e_T,i(v) = 2^x_T,i(v); with e_T(v) = alpha_T,i e_T,i(v) and the same shifts of x_S, x_T,
  acc = sum_i alpha_T,i (acc_i + shift_i sum_T,i), the *same* shift_i (the term shift_i sum_T,i is 0 when
  sum_T,i = 0, and a slice whose alpha_T,i underflows to 0 adds 0 even when its acc_i is +inf, as in the
  single pass). F = ln2 acc / sum_T - log sum_T + log sum_S.
- the top-K groups: the K_PAD largest of the SPLITS * K_PAD slice keys (one ``tl.topk``). Each slice kept
  the exact top-K_PAD group keys of its slice, keys are unique (group indices), so these are the row's
  top-K_PAD group keys, the single pass's ``run``: the candidates, ids and margins are the single pass's
  exactly; the log-probs and KL differ only by fp32 summation order.

Workspace: O(N * SPLITS * (K_PAD + 5)) -- 4 (5 with a KL) fp32 and K_PAD int64 values per (row, slice), e.g.
N = 16384, SPLITS = 8, K = 16: 19 MB -- on top of the (NUM_OUT, N) outputs. Extra traffic over the single
pass: that workspace written once and read once (against 2 * V * itemsize bytes per row of logits).

The switch (``splits`` of :func:`fastopd.kernels.token_stats_triton`, :func:`launch_token_stats` and
:func:`fastopd.kernels.opd_loss_triton`; :func:`resolve_splits`): None = the environment variable
``FASTOPD_STATS_SPLITS`` if set, else 1; 1 = the single-pass kernel (the default: the split pass is not yet
measured on a GPU); an int >= 2 = that many slices, clamped to the number of chunks (and to
:data:`MAX_SPLITS`, and to SPLITS * K_PAD <= :data:`MAX_SPLIT_KEYS` keys for the combine's top-K); a
result of 1 runs the single pass; ``"auto"`` = :func:`auto_splits`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastopd.kernels._helpers import (
    KL_FORWARD,
    KL_NONE,
    KL_REVERSE,
    SENTINEL,
    Rows,
    check_triton,
    next_pow2,
    row_base,
    topk_keys,
)
from fastopd.kernels.stats_core import (
    LOG2E,
    _stats_chunk,
    _stats_ignored,
    _stats_tail,
    stats_launch_config,
)

ENV_SPLITS = "FASTOPD_STATS_SPLITS"
MAX_SPLITS = 64
# The combine kernel sorts SPLITS * K_PAD int64 keys in one tl.topk: bounded like the tail's K_PAD * GROUP.
MAX_SPLIT_KEYS = 4096
# "auto" on CUDA: enough (row, slice) programs for this many waves of resident CTAs.
AUTO_WAVES = 4
# Resident CTAs per SM of the stats kernel on the H200 (166 registers x 128 threads: 3 of 65536 registers).
AUTO_CTAS_PER_SM = 3
# "auto" on CPU (the interpreter): a small fixed number, so the tests exercise the split pass.
AUTO_SPLITS_CPU = 4
# Partial-state rows of the fp32 workspace (N * SPLITS each).
P_MAX_S, P_SUM_S, P_MAX_T, P_SUM_T, P_ACC = (tl.constexpr(i) for i in range(5))


@triton.jit(do_not_specialize=["N", "ignore_index", "splits", "n_chunks"])
def _stats_split_kernel(
    zs_ptr, zt_ptr, tgt_ptr, part_ptr, key_ptr,
    s_stride, t_stride, s_offs_ptr, t_offs_ptr,
    N, V, ignore_index, splits, n_chunks, scale2,
    S_OFFS: tl.constexpr, T_OFFS: tl.constexpr, KL_KIND: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_SIZE: tl.constexpr, BITONIC: tl.constexpr,
):
    """Phase 1: the streaming state of one V-slice of one row (grid (N, SPLITS))."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    y = tl.load(tgt_ptr + row).to(tl.int64)
    if y == ignore_index:
        return  # the combine kernel writes the row's zeros; no logits are read

    zs_row = zs_ptr + row_base(row, s_stride, s_offs_ptr, S_OFFS)
    zt_row = zt_ptr + row_base(row, t_stride, t_offs_ptr, T_OFFS)
    BLOCK: tl.constexpr = BLOCK_G * GROUP_SIZE
    tile = tl.arange(0, BLOCK_G)[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]

    m_s = -float("inf")
    sum_s = 0.0
    m_t = -float("inf")
    sum_t = 0.0
    acc = 0.0
    run = tl.full([K_PAD], SENTINEL, tl.int64)
    # Chunks [c0, c1) of the row: balanced, non-empty (the host keeps splits <= n_chunks). The last slice
    # holds the masked tail chunk (when V is not a multiple of BLOCK); it is streamed *first*, so that
    # nothing but the streaming state is live across the loop (the other order spilled a bound on sm_90).
    v_full = (V // BLOCK) * BLOCK
    if (sp == splits - 1) & (v_full < V):
        m_s, sum_s, m_t, sum_t, acc, run = _stats_chunk(
            zs_row, zt_row, v_full, V, tile, m_s, sum_s, m_t, sum_t, acc, run, scale2,
            True, KL_KIND, K_PAD, BLOCK_G, GROUP_SIZE, BITONIC,
        )
    c0 = (sp * n_chunks) // splits
    c1 = ((sp + 1) * n_chunks) // splits
    start = c0 * BLOCK
    end = tl.minimum(c1 * BLOCK, v_full)
    while start < end:  # a while loop for the interpreter of Triton < 3.8 (see token_stats.py)
        m_s, sum_s, m_t, sum_t, acc, run = _stats_chunk(
            zs_row, zt_row, start, V, tile, m_s, sum_s, m_t, sum_t, acc, run, scale2,
            False, KL_KIND, K_PAD, BLOCK_G, GROUP_SIZE, BITONIC,
        )
        start += BLOCK

    ns = N.to(tl.int64) * splits
    idx = row * splits + sp
    tl.store(part_ptr + P_MAX_S * ns + idx, m_s)
    tl.store(part_ptr + P_SUM_S * ns + idx, sum_s)
    tl.store(part_ptr + P_MAX_T * ns + idx, m_t)
    tl.store(part_ptr + P_SUM_T * ns + idx, sum_t)
    if KL_KIND != KL_NONE:
        tl.store(part_ptr + P_ACC * ns + idx, acc)
    tl.store(key_ptr + idx * K_PAD + tl.arange(0, K_PAD), run)


@triton.jit(do_not_specialize=["N", "k", "ignore_index", "splits"])
def _stats_combine_kernel(
    zs_ptr, zt_ptr, tgt_ptr, part_ptr, key_ptr, out_ptr, ids_ptr,
    s_stride, t_stride, s_offs_ptr, t_offs_ptr,
    N, V, k, ignore_index, splits, tau, inv_tau, scale2,
    S_OFFS: tl.constexpr, T_OFFS: tl.constexpr, KL_KIND: tl.constexpr, RETURN_TOPK: tl.constexpr,
    K_PAD: tl.constexpr, GROUP_SIZE: tl.constexpr, BITONIC: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Phase 2: merge one row's SPLITS partials (module docstring), then the single pass's tail."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(tgt_ptr + row).to(tl.int64)
    j = tl.arange(0, K_PAD)
    if y == ignore_index:
        _stats_ignored(out_ptr, ids_ptr, row, N, k, j, RETURN_TOPK, K_PAD)
        return

    p = tl.arange(0, SPLITS_PAD)
    live = p < splits
    ns = N.to(tl.int64) * splits
    idx = row * splits + p
    pm_s = tl.load(part_ptr + P_MAX_S * ns + idx, mask=live, other=-float("inf"))
    psum_s = tl.load(part_ptr + P_SUM_S * ns + idx, mask=live, other=0.0)
    pm_t = tl.load(part_ptr + P_MAX_T * ns + idx, mask=live, other=-float("inf"))
    psum_t = tl.load(part_ptr + P_SUM_T * ns + idx, mask=live, other=0.0)

    # --- log-sum-exp merge (maxima in logit units; a -inf maximum counts as 0, as in _stats_chunk) ---
    m_s = tl.max(pm_s, axis=0)
    m_t = tl.max(pm_t, axis=0)
    safe_s = tl.where(m_s == -float("inf"), 0.0, m_s)
    safe_t = tl.where(m_t == -float("inf"), 0.0, m_t)
    alpha_s = tl.exp2((pm_s - safe_s) * scale2)
    alpha_t = tl.exp2((pm_t - safe_t) * scale2)
    sum_s = tl.sum(alpha_s * psum_s, axis=0)
    sum_t = tl.sum(alpha_t * psum_t, axis=0)
    acc = 0.0
    if KL_KIND == KL_REVERSE:
        # acc = sum_i alpha_S,i (acc_i - shift_i sum_S,i), shift_i = (M_S - M_S,i) c - (M_T - M_T,i) c.
        pacc = tl.load(part_ptr + P_ACC * ns + idx, mask=live, other=0.0)
        safe_ps = tl.where(pm_s == -float("inf"), 0.0, pm_s)
        safe_pt = tl.where(pm_t == -float("inf"), 0.0, pm_t)
        shift = (safe_s - safe_ps) * scale2 - (safe_t - safe_pt) * scale2
        acc = tl.sum(alpha_s * (pacc - tl.where(psum_s > 0.0, shift * psum_s, 0.0)), axis=0)
    elif KL_KIND == KL_FORWARD:
        # acc = sum_i alpha_T,i (acc_i + shift_i sum_T,i), the same shift_i; a slice whose weight alpha_T,i
        # underflows to 0 adds 0 (also when its acc_i is +inf), as in _stats_chunk.
        pacc = tl.load(part_ptr + P_ACC * ns + idx, mask=live, other=0.0)
        safe_ps = tl.where(pm_s == -float("inf"), 0.0, pm_s)
        safe_pt = tl.where(pm_t == -float("inf"), 0.0, pm_t)
        shift = (safe_s - safe_ps) * scale2 - (safe_t - safe_pt) * scale2
        part = alpha_t * (pacc + tl.where(psum_t > 0.0, shift * psum_t, 0.0))
        acc = tl.sum(tl.where(alpha_t > 0.0, part, 0.0), axis=0)

    # --- top-K_PAD group keys of the row: one top-K over the SPLITS * K_PAD slice keys ---
    kidx = idx[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    keys = tl.load(key_ptr + kidx, mask=live[:, None], other=SENTINEL)
    run = topk_keys(tl.reshape(keys, [SPLITS_PAD * K_PAD]), K_PAD, BITONIC)

    zs_row = zs_ptr + row_base(row, s_stride, s_offs_ptr, S_OFFS)
    zt_row = zt_ptr + row_base(row, t_stride, t_offs_ptr, T_OFFS)
    _stats_tail(
        zs_row, zt_row, out_ptr, ids_ptr, row, y, run, m_s, sum_s, m_t, sum_t, acc, N, V, k, tau, inv_tau,
        j, tl.arange(0, GROUP_SIZE)[None, :], KL_KIND, RETURN_TOPK, K_PAD, GROUP_SIZE, BITONIC,
    )


def stats_splits_default() -> int | str:
    """What ``splits=None`` means: ``FASTOPD_STATS_SPLITS`` (an int >= 1 or ``auto``) when set, else 1.

    The one place that reads the variable; a malformed value is a ValueError naming it.
    """
    raw = os.environ.get(ENV_SPLITS, "").strip()
    if not raw:
        return 1
    if raw.lower() == "auto":
        return "auto"
    try:
        val = int(raw)
    except ValueError:
        val = 0
    if val < 1:
        raise ValueError(f"{ENV_SPLITS} must be 'auto' or an int >= 1, got {raw!r}")
    return val


def check_splits(splits) -> None:
    """``splits`` must be None, ``"auto"`` or an int >= 1 (a clear ValueError naming it otherwise)."""
    if splits is None or splits == "auto":
        return
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be None, 'auto' or an int >= 1, got {splits!r}")


def auto_splits(n: int, device: torch.device) -> int:
    """The ``"auto"`` heuristic (before the clamps of :func:`resolve_splits`).

    CUDA: the smallest splits with N * splits >= AUTO_WAVES * (SMs * AUTO_CTAS_PER_SM), i.e. about four waves
    of resident CTAs (3 per SM: the stats kernel's registers on the H200); 1 when the rows alone give that
    (e.g. N = 16384 on 132 SMs: 1584 programs suffice, so auto keeps the single pass there; N = 1024 gets 2).
    Elsewhere (the CPU interpreter) a small fixed number, AUTO_SPLITS_CPU.
    """
    if device.type != "cuda":
        return AUTO_SPLITS_CPU
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = AUTO_WAVES * sms * AUTO_CTAS_PER_SM
    return max(1, -(-want // max(n, 1)))


def resolve_splits(splits, n: int, v: int, k_pad: int, block: int, device: torch.device) -> int:
    """The number of V-slices a launch uses: None -> :func:`stats_splits_default`, ``"auto"`` ->
    :func:`auto_splits`; then clamped to [1, number of chunks of ``block`` columns], MAX_SPLITS and
    MAX_SPLIT_KEYS // k_pad. 1 means the single-pass kernel."""
    check_splits(splits)
    if splits is None:
        splits = stats_splits_default()
    if splits == "auto":
        splits = auto_splits(n, device)
    n_chunks = -(-max(v, 1) // block)
    return max(1, min(int(splits), n_chunks, MAX_SPLITS, MAX_SPLIT_KEYS // k_pad))


def launch_token_stats_split(
    student: Rows,
    teacher: Rows,
    target_ids: torch.Tensor,
    out: torch.Tensor,
    ids: torch.Tensor | None,
    *,
    splits: int,
    v: int,
    k: int,
    temperature: float,
    ignore_index: int,
    kind: int,
    return_topk: bool,
    cfg: dict,
) -> None:
    """Run both phases into ``out`` (NUM_OUT, N) and ``ids``; ``splits`` >= 2 already clamped
    (:func:`resolve_splits`), ``kind`` the KL_KIND (0 none, 1 reverse, 2 forward:
    :func:`fastopd.kernels._helpers.kl_kind`), ``cfg`` the single pass's :func:`stats_launch_config`."""
    check_triton()
    n = student.n
    device = student.data.device
    block = cfg["BLOCK_G"] * cfg["GROUP_SIZE"]
    n_chunks = triton.cdiv(v, block)
    if not 2 <= splits <= n_chunks:
        raise ValueError(f"splits must be in [2, {n_chunks}] (chunks of {block} columns), got {splits}")
    k_pad = cfg["K_PAD"]
    if kind not in (0, 1, 2):
        raise ValueError(f"kind must be 0 (no KL), 1 (reverse) or 2 (forward), got {kind!r}")
    part = torch.empty((4 + int(kind != 0), n * splits), dtype=torch.float32, device=device)
    keys = torch.empty((n * splits, k_pad), dtype=torch.int64, device=device)
    tgt = target_ids.reshape(-1)
    tau = float(temperature)
    scale2 = LOG2E / tau
    common = dict(S_OFFS=student.use_offsets, T_OFFS=teacher.use_offsets, KL_KIND=int(kind),
                  K_PAD=k_pad, GROUP_SIZE=cfg["GROUP_SIZE"], BITONIC=cfg["BITONIC"])
    _stats_split_kernel[(n, splits)](
        student.data, teacher.data, tgt, part, keys,
        student.stride, teacher.stride, student.offsets_arg(), teacher.offsets_arg(),
        n, v, ignore_index, splits, n_chunks, scale2,
        BLOCK_G=cfg["BLOCK_G"], num_warps=cfg["num_warps"], **common,
    )
    _stats_combine_kernel[(n,)](
        student.data, teacher.data, tgt, part, keys, out, ids if ids is not None else out,
        student.stride, teacher.stride, student.offsets_arg(), teacher.offsets_arg(),
        n, v, k, ignore_index, splits, tau, 1.0 / tau, scale2,
        RETURN_TOPK=bool(return_topk), SPLITS_PAD=max(2, next_pow2(splits)), num_warps=4, **common,
    )


def split_launch_configs(v: int, k: int, splits: int, *, bitonic: bool = True) -> tuple[dict, dict]:
    """(phase-1 constexprs + num_warps, combine constexprs + num_warps) of a launch, for the AOT check."""
    cfg = stats_launch_config(v, k, bitonic=bitonic)
    phase1 = dict(cfg)
    combine = {key: cfg[key] for key in ("K_PAD", "GROUP_SIZE", "BITONIC")}
    combine.update(SPLITS_PAD=max(2, next_pow2(splits)), num_warps=4)
    return phase1, combine


__all__ = [
    "ENV_SPLITS",
    "auto_splits",
    "check_splits",
    "launch_token_stats_split",
    "resolve_splits",
    "split_launch_configs",
    "stats_splits_default",
]
