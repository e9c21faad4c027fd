"""The pure PyTorch/NumPy oracle of docs/formulas.md §1, §3, §4 and §5.

Every other implementation in fastopd (the Triton kernels, the C++ scan) is tested against this module, and
every benchmark uses it as its baseline, so it is written to be read first and to be competent PyTorch
second: vectorised ``log_softmax`` / ``topk`` / ``gather``, fp32 arithmetic (fp64 when given fp64 inputs, so
it doubles as the fp64 ground truth), no Python loops over tokens. The BIC scan is the exception: it is
plain Python over one rollout at a time, in exactly the floating-point order that the C++ scan uses, so the
two agree bit for bit.

Sections:
- 1. token statistics: :func:`token_stats`, and its public pieces :func:`logprobs`, :func:`reverse_kl`,
  :func:`forward_kl`, :func:`topk_candidates` (the hidden-state path's CPU backend, :mod:`fastopd.linear`,
  reuses the first three)
- 2. segment means (the segmentation itself is in :mod:`fastopd.segment`): :func:`segment_means`
- 3. release point: :func:`bic_release`; online release (§8): :func:`online_release`
- 4. weights: :func:`release_weights`, :func:`control_weights`
- 5. loss: :func:`opd_loss`
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastopd._validate import (
    StatsOptions,
    check_confirm_segments,
    check_fraction,
    check_ragged,
    check_release_segment,
    check_scan_options,
    check_segment_ids,
    check_token_inputs,
)
from fastopd.common import (  # noqa: F401  (LOSSES, CONTROLS, reduce_loss, ... re-exported for callers)
    CONTROLS,
    LOSSES,
    check_loss_options,
    loss_metrics,
    per_token_loss,
    reduce_loss,
    series_from_sums,
    weight_mask,
)
from fastopd.types import OnlineReleaseResult, OPDOutput, ReleaseResult, SegmentMeans, TokenStats

BIC_EPS = 1e-12


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (the ground truth)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# 1. Token statistics
# ----------------------------------------------------------------------------------------------------------


def topk_candidates(z: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (..., V) of the K largest entries of ``z`` per row, ties to the lower index (C_t).

    ``torch.topk`` does not promise which of several equal values it returns, so the K-th value is used as
    a threshold: every entry above it is in, and the entries equal to it are taken in index order until K.
    """
    kth = torch.topk(z, k, dim=-1).values[..., -1:]
    above = z > kth
    at = z == kth
    room = k - above.sum(-1, keepdim=True)
    return above | (at & (torch.cumsum(at, dim=-1) <= room))


def _candidate_ids(z: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """int64 (..., K) ids of the candidates, by decreasing ``z``, ties to the lower index."""
    ids = torch.argsort(cand.to(torch.int8), dim=-1, descending=True, stable=True)[..., :k]
    order = torch.sort(z.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)


def _stats(
    zs: torch.Tensor,
    zt: torch.Tensor,
    ls: torch.Tensor,
    lt: torch.Tensor,
    target_ids: torch.Tensor,
    valid: torch.Tensor,
    opts: StatsOptions,
    *,
    full_kl: bool,
    return_topk: bool,
) -> TokenStats:
    """Section 1 from already computed log-probs ``ls``/``lt`` (shared by token_stats and opd_loss)."""
    k, temperature = opts.k, opts.temperature
    tgt = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long().unsqueeze(-1)
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    s = torch.where(valid, ls.gather(-1, tgt).squeeze(-1), zero)
    u = torch.where(valid, lt.gather(-1, tgt).squeeze(-1), zero)
    cand = topk_candidates(zs, k)
    top2 = torch.topk(zt.masked_fill(~cand, -math.inf), 2, dim=-1).values
    a1, a2 = top2[..., 0], top2[..., 1]
    # a1 == a2 (including two -inf candidates) is a zero margin, not inf - inf = NaN.
    m = torch.where(a1 == a2, zero, (a1 - a2) / temperature)
    # A row with a NaN or +inf logit, or no finite one, has no log-softmax (its loss is NaN): its margin is NaN
    # too, so the release rule sees it (docs/formulas.md §1) instead of a plausible 0.
    finite = torch.isfinite(zs.amax(-1)) & torch.isfinite(zt.amax(-1))
    m = torch.where(finite, m, torch.full_like(m, math.nan))
    stats = TokenStats(
        student_logprobs=s,
        teacher_logprobs=u,
        advantages=u - s,
        margins=torch.where(valid, m, zero),
        valid=valid,
    )
    if full_kl:
        stats.reverse_kl = torch.where(valid, reverse_kl(ls, lt), zero)
    if return_topk:
        ids = _candidate_ids(zs, cand, k)
        stats.topk_ids = torch.where(valid.unsqueeze(-1), ids, torch.full_like(ids, -1))  # -1: no candidate
    return stats


def _weighted_log_ratio(p: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """sum_v p(v) (la(v) - lb(v)) with the terms where p(v) = 0 counted as 0 -- in value *and* gradient: the
    log ratio is masked before the product, so a masked vocabulary entry (a -inf logit: p = 0, la - lb = -inf
    or NaN) adds 0 to the gradient too, not 0 * inf = NaN (the kernels skip such terms the same way)."""
    ratio = torch.where(p == 0, torch.zeros_like(p), la - lb)
    return (p * ratio).sum(-1)


def reverse_kl(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """KL_t = sum_v p_S(v) (log p_S(v) - log p_T(v)); terms with p_S(v) = 0 contribute 0 (and no gradient); a row
    without a log-softmax (a NaN or +inf logit in either model) gives NaN, as its margin (docs/formulas.md §1)."""
    return _weighted_log_ratio(ls.exp(), ls, lt)


def forward_kl(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S)_t = sum_v p_T(v) (log p_T(v) - log p_S(v)); terms with p_T(v) = 0 contribute 0 (and no
    gradient); a row without a log-softmax gives NaN, as :func:`reverse_kl`."""
    return _weighted_log_ratio(lt.exp(), lt, ls)


def logprobs(logits: torch.Tensor, v: int, temperature: float,
             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, log softmax(z / tau)) over the first ``v`` columns, in the compute dtype.

    With ``valid`` (the shape of ``logits[..., 0]``), the rows that are not valid are never read: they are
    replaced by zeros, so a NaN there reaches neither the result nor (through autograd) the gradient.
    """
    z = logits[..., :v].to(_compute_dtype(logits))
    if valid is not None and not bool(valid.all()):
        z = torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))
    return z, torch.log_softmax(z / temperature, dim=-1)


def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    options: StatsOptions | None = None,
    full_kl: bool = False,
    return_topk: bool = False,
    **fields,
) -> TokenStats:
    """Per-token statistics of docs/formulas.md §1, computed the plain way (materialises N x V).

    s_t = log p_S(y_t), u_t = log p_T(y_t), A_t = u_t - s_t, m_t = (z_T[a1] - z_T[a2]) / tau over the
    student's top-K candidates C_t (ties to the lower index), and optionally the exact reverse KL_t.
    Returns float32 tensors (float64 for float64 inputs); invalid positions hold 0. No gradient flows.
    ``options``: a :class:`fastopd.StatsOptions` (k, temperature, ignore_index, vocab_size), or its fields as
    keywords (``k=4``).
    """
    opts = StatsOptions.of(options, **fields)
    v = check_token_inputs(student_logits, teacher_logits, target_ids, opts)
    with torch.no_grad():
        zs, ls = logprobs(student_logits, v, opts.temperature)
        zt, lt = logprobs(teacher_logits, v, opts.temperature)
        return _stats(
            zs, zt, ls, lt, target_ids, target_ids != opts.ignore_index, opts,
            full_kl=full_kl, return_topk=return_topk,
        )


# ----------------------------------------------------------------------------------------------------------
# 2. Segment means
# ----------------------------------------------------------------------------------------------------------


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    return np.asarray(x)


def segment_means(values, segment_ids, valid) -> SegmentMeans:
    """Per-rollout means x_j of a per-token value over the valid tokens of each segment (docs/formulas.md §2).

    Args:
        values: (B, L) per-token values, e.g. ``TokenStats.margins``.
        segment_ids: (B, L) int segment id per token (from :func:`fastopd.token_segments`): at valid positions
            in [0, L) and non-decreasing along the row; ids of invalid positions are ignored (use -1 for
            padding).
        valid: (B, L) bool, which tokens count.

    Returns:
        :class:`SegmentMeans` (float64 values, int64 offsets of length B+1, and the segment id of every
        entry). Every valid token weighs the same; segments without a valid token are left out.
    """
    vals = _as_numpy(values, "values")
    if np.iscomplexobj(vals) or not (np.issubdtype(vals.dtype, np.number) or vals.dtype == bool):
        raise TypeError(f"values must be real numbers (e.g. TokenStats.margins), got {vals.dtype}")
    vals = vals.astype(np.float64)
    seg = _as_numpy(segment_ids, "segment_ids")
    ok = _as_numpy(valid, "valid")
    if vals.ndim != 2:
        raise ValueError(f"values must have shape (B, L), got {vals.shape}")
    if seg.shape != vals.shape or ok.shape != vals.shape:
        raise ValueError(
            f"values, segment_ids and valid must share one (B, L) shape, got {vals.shape}, {seg.shape}, {ok.shape}"
        )
    if not np.issubdtype(seg.dtype, np.integer):
        raise TypeError(f"segment_ids must be an integer array, got {seg.dtype}")
    ok = ok.astype(bool)
    b, _ = vals.shape
    check_segment_ids(torch.from_numpy(np.ascontiguousarray(seg, dtype=np.int64)), torch.from_numpy(ok.copy()))
    width = int(seg[ok].max()) + 1 if ok.any() else 1
    rows = np.broadcast_to(np.arange(b)[:, None], vals.shape)
    key = rows[ok].astype(np.int64) * width + seg[ok].astype(np.int64)
    sums = np.bincount(key, weights=vals[ok], minlength=b * width)
    counts = np.bincount(key, minlength=b * width)
    return series_from_sums(sums.reshape(b, width), counts.reshape(b, width))


# ----------------------------------------------------------------------------------------------------------
# 3. Release: profiled RSS-BIC, one downward change point
# ----------------------------------------------------------------------------------------------------------


# A series with max |x_i| in [2^(E-1), 2^E) is scanned as x_i 2^-E when E + n.bit_length() > _SCALE_LIMIT: below
# it the centred values |d_i| < 2^(E+1), S2 < 2^(2E+k+3) and (S1[b] - S1[a])^2 < 2^(2E+2k+4) <= 2^1020 cannot
# overflow (docs/formulas.md §3, "Decision (huge values)"; kScaleLimit in csrc/bic_scan.cpp).
_SCALE_LIMIT = 508


def _scale_exponent(x: list[float]) -> int:
    """E such that the (finite, non-empty) series is scanned as x_i 2^-E, or 0 when it is scanned as given."""
    amax = 0.0
    for v in x:
        a = math.fabs(v)
        amax = a if a > amax else amax
    if amax == 0.0:
        return 0
    e = math.frexp(amax)[1]
    return e if e + len(x).bit_length() > _SCALE_LIMIT else 0


def _log_scaled(q: float, e2: int) -> float:
    """ln(q 2^e2 + eps): BIC's log argument RSS/n + eps of a series as given, from q = RSS'/n of its copy scaled
    by 2^-(e2/2), without forming RSS/n (it may overflow) or eps 2^-e2 (it may underflow).

    With a = ln(q 2^e2) and u = a - ln eps: a + log1p(e^-u) if u > 0, else ln eps + log1p(e^u); q = 0 gives
    ln eps. The operation order of log_scaled in csrc/bic_scan.cpp.
    """
    log_eps = math.log(BIC_EPS)
    if q == 0.0:
        return log_eps
    a = math.log(q) + float(e2) * math.log(2.0)
    u = a - log_eps
    return a + math.log1p(math.exp(-u)) if u > 0.0 else log_eps + math.log1p(math.exp(u))


def _scan_one(x: list[float], m: int, min_gain: float) -> tuple[int, float, bool]:
    """(release_index, gain, accepted) for one series; the exact operation order of csrc/bic_scan.cpp."""
    n = len(x)
    if any(not math.isfinite(v) for v in x):
        return n, math.nan, False
    if n < 2 * m:
        return n, -math.inf, False
    e = _scale_exponent(x)
    if e:  # huge values: scan x 2^-e (exact), every log argument taken back to the series as given
        x = [math.ldexp(v, -e) for v in x]

    def log_arg(r: float) -> float:  # ln(r/n + eps) of the series as given, r the (scaled) RSS
        return math.log(r / n + BIC_EPS) if not e else _log_scaled(r / n, 2 * e)

    total = 0.0
    for v in x:
        total += v
    c = total / n  # centre first: an exactly constant series then has an exactly zero RSS
    s1 = [0.0] * (n + 1)
    s2 = [0.0] * (n + 1)
    for i, v in enumerate(x):
        d = v - c
        s1[i + 1] = s1[i] + d
        s2[i + 1] = s2[i] + d * d

    def rss(a: int, b: int) -> float:
        d = s1[b] - s1[a]
        r = (s2[b] - s2[a]) - d * d / (b - a)
        return r if r > 0.0 else 0.0

    log_n = math.log(n)
    bic0 = n * log_arg(rss(0, n)) + 2.0 * log_n
    best_tau, best_bic = -1, math.inf
    for tau in range(m, n - m + 1):
        left = s1[tau] / tau
        right = (s1[n] - s1[tau]) / (n - tau)
        if right < left:
            bic1 = n * log_arg(rss(0, tau) + rss(tau, n)) + 4.0 * log_n
            if best_tau < 0 or bic1 < best_bic:
                best_tau, best_bic = tau, bic1
    if best_tau < 0:
        return n, -math.inf, False
    gain = bic0 - best_bic
    accepted = gain > min_gain
    return (best_tau if accepted else n), gain, bool(accepted)


def bic_release(values, offsets, *, min_segments: int = 2, min_gain: float = 10.0) -> ReleaseResult:
    """Profiled RSS-BIC release point of every rollout of a ragged batch (docs/formulas.md §3), in Python.

    Args:
        values: float64 1-D, the concatenated segment-mean series.
        offsets: int64 of length B+1; rollout b is ``values[offsets[b]:offsets[b+1]]``.
        min_segments: m, the fewest segments on each side of a split.
        min_gain: accept the split when BIC0 - BIC1(tau*) exceeds this.

    Returns:
        :class:`ReleaseResult`. No candidate (n < 2m or no strictly downward split): gain = -inf, r = n.
        A non-finite value in a series: gain = NaN, not accepted, r = n.
    """
    check_scan_options(min_segments, min_gain)
    vals, offs = check_ragged(values, offsets)
    b = len(offs) - 1
    release = np.empty(b, dtype=np.int64)
    gain = np.empty(b, dtype=np.float64)
    accepted = np.empty(b, dtype=bool)
    for i in range(b):
        x = vals[offs[i]:offs[i + 1]].tolist()
        release[i], gain[i], accepted[i] = _scan_one(x, int(min_segments), float(min_gain))
    return ReleaseResult(release, gain, accepted)


def online_release(values, offsets, *, min_segments: int = 2, min_gain: float = 10.0,
                   confirm_segments: int = 2) -> OnlineReleaseResult:
    """The online release rule (docs/formulas.md §8) replayed on logged series, by brute force.

    For each rollout and each prefix length n' = 1..n of its series, the scan of §3 on the first n' entries
    (:func:`_scan_one`, nothing skipped); the rollout stops at the first n' whose scan is accepted with release
    index r and n' - r >= ``confirm_segments``. A rollout that never stops gets the scan of its whole series.

    Returns:
        :class:`OnlineReleaseResult` (stop_index n' or n, release_index, gain, accepted, stopped).
    """
    check_scan_options(min_segments, min_gain)
    check_confirm_segments(confirm_segments, min_segments)
    vals, offs = check_ragged(values, offsets)
    b = len(offs) - 1
    stop = np.empty(b, dtype=np.int64)
    release = np.empty(b, dtype=np.int64)
    gain = np.empty(b, dtype=np.float64)
    accepted = np.empty(b, dtype=bool)
    stopped = np.zeros(b, dtype=bool)
    m, g, c = int(min_segments), float(min_gain), int(confirm_segments)
    for i in range(b):
        x = vals[offs[i]:offs[i + 1]].tolist()
        stop[i], (release[i], gain[i], accepted[i]) = len(x), _scan_one(x, m, g)
        for n_prefix in range(1, len(x) + 1):
            r, gn, acc = _scan_one(x[:n_prefix], m, g)
            if acc and n_prefix - r >= c:
                stop[i], release[i], gain[i], accepted[i], stopped[i] = n_prefix, r, gn, acc, True
                break
    return OnlineReleaseResult(release, gain, accepted, stop, stopped)


# ----------------------------------------------------------------------------------------------------------
# 4. Weights
# ----------------------------------------------------------------------------------------------------------


def _as_mask_tensors(segment_ids, valid_mask) -> tuple[torch.Tensor, torch.Tensor]:
    seg = segment_ids if isinstance(segment_ids, torch.Tensor) else torch.as_tensor(np.asarray(segment_ids))
    valid = valid_mask if isinstance(valid_mask, torch.Tensor) else torch.as_tensor(np.asarray(valid_mask))
    if seg.dim() != 2:
        raise ValueError(f"segment_ids must have shape (B, L), got {tuple(seg.shape)}")
    if valid.shape != seg.shape:
        raise ValueError(f"valid_mask must have the shape of segment_ids {tuple(seg.shape)}, got {tuple(valid.shape)}")
    if seg.dtype.is_floating_point or seg.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {seg.dtype}")
    valid = valid.to(device=seg.device, dtype=torch.bool)
    check_segment_ids(seg, valid)
    return seg.long(), valid


def _rescale(kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """w = kept * L / L_kept per row (so sum w = L); a row with nothing kept gets zeros."""
    n_valid = valid.sum(-1, keepdim=True).to(torch.float32)
    n_kept = kept.sum(-1, keepdim=True).to(torch.float32)
    scale = torch.where(n_kept > 0, n_valid / n_kept.clamp_min(1), torch.zeros_like(n_kept))
    return kept.to(torch.float32) * scale


def release_weights(segment_ids, valid_mask, release_segment) -> torch.Tensor:
    """Per-token weights of docs/formulas.md §4: w_t = valid_t [g_t < r] L / L_kept.

    Args:
        segment_ids: (B, L) int segment id g_t of every token (ignored where not valid).
        valid_mask: (B, L) bool valid_t.
        release_segment: (B,) int r per rollout, in segment ids: segments ``< r`` are kept. A rollout that
            was not accepted passes r >= its segment count and keeps w = valid.

    Returns:
        float32 (B, L) on ``segment_ids``' device; each row sums to its number of valid tokens (or 0 when
        ``r`` keeps nothing).
    """
    seg, valid = _as_mask_tensors(segment_ids, valid_mask)
    r = check_release_segment(release_segment, seg.shape[0])
    kept = valid & (seg < r.to(seg.device).unsqueeze(-1))
    return _rescale(kept, valid)


def control_weights(
    kind: str,
    segment_ids,
    valid_mask,
    *,
    fraction: float = 0.5,
    generator: np.random.Generator | int | None = None,
    kept_fractions=None,
) -> torch.Tensor:
    """The controls of docs/formulas.md §4, each rescaled to keep the loss mass like the release rule.

    Args:
        kind: ``"full"`` (w = valid), ``"fixed_prefix"`` (keep the first ``ceil(fraction * L)`` valid tokens)
            or ``"random"`` (cut at a uniformly random boundary between two of the row's segments; a row
            with a single segment keeps everything), or ``"shuffled"`` (the rule's kept fractions
            ``kept_fractions`` permuted among the batch's rows by ``generator``; each row is cut at the
            segment boundary nearest its borrowed fraction, :func:`cut_nearest_fraction`).
        segment_ids, valid_mask: (B, L) as in :func:`release_weights`.
        fraction: kept fraction for ``fixed_prefix``, in (0, 1].
        generator: numpy Generator or seed for ``random`` and ``shuffled``.
        kept_fractions: (B,) the release rule's L_kept / L of every row (``shuffled`` only; NaN for a row
            without valid tokens).
    """
    if kind not in CONTROLS:
        raise ValueError(f"kind must be one of {CONTROLS}, got {kind!r}")
    seg, valid = _as_mask_tensors(segment_ids, valid_mask)
    if kind == "full":
        return valid.to(torch.float32)
    if kind == "fixed_prefix":
        check_fraction(fraction)
        n_valid = valid.sum(-1, keepdim=True)
        n_keep = torch.ceil(n_valid.double() * float(fraction)).long().clamp(min=1)
        kept = valid & (torch.cumsum(valid.long(), dim=-1) <= n_keep)
        return _rescale(kept, valid)
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    if kind == "shuffled":
        if kept_fractions is None:
            raise ValueError("kind='shuffled' needs kept_fractions= (B,), the release rule's kept fraction per row")
        kf = _as_numpy(kept_fractions, "kept_fractions").astype(np.float64)
        if kf.shape != (seg.shape[0],):
            raise ValueError(f"kept_fractions must have shape (B,) = ({seg.shape[0]},), got {kf.shape}")
        borrowed = kf[rng.permutation(seg.shape[0])]
        return release_weights(seg, valid, cut_nearest_fraction(seg, valid, borrowed))
    seg_np, valid_np = seg.cpu().numpy(), valid.cpu().numpy()
    r = np.empty(seg.shape[0], dtype=np.int64)
    for b in range(seg.shape[0]):
        present = np.unique(seg_np[b][valid_np[b]])
        r[b] = present[rng.integers(1, len(present))] if len(present) >= 2 else np.iinfo(np.int64).max
    return release_weights(seg, valid, r)


def cut_nearest_fraction(segment_ids, valid_mask, fractions) -> np.ndarray:
    """Per row, the release segment id whose cut keeps the fraction of valid tokens nearest ``fractions[b]``.

    The candidate cuts are the starts of the row's segments after its first one, and the end of the row
    (keep everything), so at least the first segment is kept; on a tie the earlier cut wins. A NaN
    fraction (a row without valid tokens on the rule's side) keeps everything. Returns int64 (B,), ready for
    :func:`release_weights`.
    """
    seg, valid = _as_mask_tensors(segment_ids, valid_mask)
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (seg.shape[0],):
        raise ValueError(f"fractions must have shape (B,) = ({seg.shape[0]},), got {f.shape}")
    seg_np, valid_np = seg.cpu().numpy(), valid.cpu().numpy()
    out = np.full(seg.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    for b in range(seg.shape[0]):
        g = seg_np[b][valid_np[b]]
        if g.size == 0 or not np.isfinite(f[b]):
            continue
        present, counts = np.unique(g, return_counts=True)  # sorted segment ids and their token counts
        kept = np.cumsum(counts)[:-1] / g.size  # kept fraction when cutting before present[1], present[2], ...
        cands = np.append(kept, 1.0)
        j = int(np.argmin(np.abs(cands - f[b])))  # first minimum: the earlier cut on a tie
        if j < len(kept):
            out[b] = present[j + 1]
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. Loss
# ----------------------------------------------------------------------------------------------------------


def opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    loss: str = "pg",
    old_logprobs: torch.Tensor | None = None,
    normalizer=None,
    options: StatsOptions | None = None,
    **fields,
) -> OPDOutput:
    """The OPD loss of docs/formulas.md §5 by plain autograd (the oracle for the kernels' backward).

    ``pg``: l_t = -w_t sg(A_t) rho_t, rho_t = exp(s_t - sg(s_old_t)), A_t = u_t - s_old_t (s_old = sg(s)
    when ``old_logprobs`` is None). ``reverse_kl``: l_t = w_t KL_t; ``forward_kl``: l_t = w_t KL(p_T || p_S)_t
    (GKD's forward divergence on the student's own tokens). loss = sum_t l_t / normaliser, the
    normaliser being the number of valid tokens unless given. ``weights=None`` means the valid mask;
    weights at invalid positions are ignored. Teacher logits get no gradient. ``options`` (or its fields as
    keywords) as in :func:`token_stats`.
    """
    opts = StatsOptions.of(options, **fields)
    v = check_token_inputs(student_logits, teacher_logits, target_ids, opts)
    check_loss_options(loss, weights, old_logprobs, target_ids)
    valid = target_ids != opts.ignore_index
    # ignored rows are never read (docs/formulas.md §1): a NaN there must not poison the gradient
    zs, ls = logprobs(student_logits, v, opts.temperature, valid)
    with torch.no_grad():
        zt, lt = logprobs(teacher_logits.detach(), v, opts.temperature, valid)
        stats = _stats(zs.detach(), zt, ls.detach(), lt, target_ids, valid, opts, full_kl=False, return_topk=False)
    w = weight_mask(valid, weights, ls.dtype)
    if loss == "pg":
        tgt = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long().unsqueeze(-1)
        s = ls.gather(-1, tgt).squeeze(-1)
        terms = per_token_loss("pg", valid, w, s=s, u=stats.teacher_logprobs, old_logprobs=old_logprobs)
        stats.advantages = terms.advantages
    else:  # a divergence, computed once: the loss term, and (detached) its TokenStats field
        kl = (reverse_kl if loss == "reverse_kl" else forward_kl)(ls, lt)
        setattr(stats, loss, torch.where(valid, kl.detach(), torch.zeros((), dtype=kl.dtype, device=kl.device)))
        terms = per_token_loss(loss, valid, w, kl=kl)
    return reduce_loss(terms.per_token, stats, w, loss, normalizer)
