"""The neutral plumbing every implementation shares: option names, kernel limits, the per-token loss, the
reduction, the metrics and the rule's diagnostics.

Both the oracle (:mod:`fastopd.reference`) and the fast paths (:mod:`fastopd.kernels`, :mod:`fastopd.loss`,
:mod:`fastopd.release`) import this module; it imports neither, so a test that compares a fast path with
the oracle never compares a formula with itself. Argument validation lives next door in
:mod:`fastopd._validate` (same rule: it imports no implementation).

What is here, each once:

- option names: :data:`LOSSES`, :data:`CONTROLS`, :data:`WEIGHTS` (alias :data:`MODES`); the kernels' limits :data:`KERNEL_DTYPES`,
  :data:`KERNEL_MAX_K`, :data:`TRITON_FLOOR`; :func:`check_loss_options`.
- the per-token loss of docs/formulas.md §5 and the row factor c_t of its gradient: :func:`weight_mask`,
  :func:`per_token_loss`.
- the reduction sum_t l_t / normaliser and the loss metrics: :func:`reduce_loss`, :func:`loss_metrics`.
- (B, S) segment sums and counts -> the ragged series: :func:`series_from_sums`; release index (into a
  rollout's series) -> segment id: :func:`release_segment_ids`.
- the rule's diagnostics (accept rate, mean gain, kept fraction, release position), as additive sums and
  their means, so one batch, one trainer step over micro-batches and processes, and the demo's logs all
  use one definition: :func:`release_fractions`, :func:`release_sums`, :func:`release_means`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fastopd._validate import check_per_token
from fastopd.options import BACKENDS  # noqa: F401  (the backends' names, with the other option names)
from fastopd.types import OPDOutput, ReleaseResult, SegmentMeans, TokenStats

LOSSES = ("pg", "reverse_kl", "forward_kl")
# The losses whose per-token term is a full-vocabulary divergence (l_t = w_t D_t, row factor c_t = w_t).
DIVERGENCES = ("reverse_kl", "forward_kl")
CONTROLS = ("full", "fixed_prefix", "random", "shuffled")
WEIGHTS = ("release",) + CONTROLS
"""Which tokens count: the release rule or a control (docs/formulas.md §4, §8); ``ReleaseRule(mode=...)`` takes one."""
MODES = WEIGHTS  # the name ReleaseRule's ``mode`` argument has always used (fastopd.MODES)

# The Triton kernels read fp16/bf16/fp32 logits (fp32 arithmetic) and take k <= 256 (the streaming top-K
# holds at most 256 candidates); backend="auto" hands anything else to the reference.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_MAX_K = 256
# The losses the Triton kernels implement (all of them now); backend="auto" hands any other to the reference,
# "triton" refuses it (the mechanism stays for a future loss; tests/test_dispatch.py exercises it).
KERNEL_LOSSES = LOSSES
# Oldest Triton the kernels compile with (3.3.1 lacks tl.topk); pyproject.toml and the README state the same,
# fastopd._dispatch enforces it, scripts/ci_triton_matrix.sh compiles the kernels under it (docs/kernels.md).
TRITON_FLOOR = (3, 4)


def check_loss_options(loss: str, weights, old_logprobs, target_ids) -> None:
    """Shared checks of ``opd_loss``'s options (every backend)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    check_per_token("weights", weights, target_ids)
    check_per_token("old_logprobs", old_logprobs, target_ids)
    if old_logprobs is not None and loss != "pg":
        raise ValueError("old_logprobs is only used by loss='pg'")


# ----------------------------------------------------------------------------------------------------------
# docs/formulas.md §5: the per-token loss and the factor its gradient needs
# ----------------------------------------------------------------------------------------------------------


def weight_mask(valid: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """w_t in ``dtype``: the valid mask when ``weights`` is None, else ``weights`` with 0 at invalid positions."""
    if weights is None:
        return valid.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid, weights.detach().to(dtype), zero)


class PerTokenLoss(NamedTuple):
    """l_t, the gradient's row factor c_t, and the advantage the ``pg`` loss used (None for the divergences).

    c_t is what multiplies the per-row vector of the gradient w.r.t. the student logits:
    dl_t/dz_S = c_t (p_S - e_{y_t}) / tau for ``pg`` (c_t = w_t A_t rho_t),
    dl_t/dz_S = c_t p_S ((log p_S - log p_T) - KL_t) / tau for ``reverse_kl`` and
    dl_t/dz_S = c_t (p_S - p_T) / tau for ``forward_kl`` (c_t = w_t for both). It is detached.
    """

    per_token: torch.Tensor
    coef: torch.Tensor
    advantages: torch.Tensor | None


def per_token_loss(
    loss: str,
    valid: torch.Tensor,
    w: torch.Tensor,
    *,
    s: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
) -> PerTokenLoss:
    """The per-token OPD loss of docs/formulas.md §5 (both the reference and the Triton autograd call this).

    ``pg``: l_t = -w_t sg(A_t) rho_t with rho_t = exp(s_t - sg(s_old_t)) and A_t = u_t - s_old_t, where
    s_old = sg(s) when ``old_logprobs`` is None; needs ``s`` (which may carry a gradient) and ``u``.
    ``reverse_kl`` / ``forward_kl``: l_t = w_t D_t with D_t that divergence (KL(p_S || p_T) or
    KL(p_T || p_S)), passed as ``kl`` (which may carry a gradient). ``w`` is :func:`weight_mask`'s; every
    tensor has one shape and the dtype of ``w``; l_t = 0 at invalid positions.
    """
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    if loss in DIVERGENCES:
        return PerTokenLoss(torch.where(valid, w * kl, zero), torch.where(valid, w, zero), None)
    s_old = s.detach() if old_logprobs is None else old_logprobs.detach().to(w.dtype)
    adv = torch.where(valid, u - s_old, zero)
    rho = torch.exp(torch.where(valid, s - s_old, zero))
    # l = -w A rho  =>  dl/dz = w A rho (p - e_y) / tau: the two minus signs cancel (docs/formulas.md §5).
    coef = torch.where(valid, w * adv * rho, zero)
    return PerTokenLoss(torch.where(valid, -coef, zero), coef.detach(), adv)


# ----------------------------------------------------------------------------------------------------------
# docs/formulas.md §5: reduction and metrics
# ----------------------------------------------------------------------------------------------------------


def normaliser(normalizer, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The loss's divisor: the number of valid tokens (at least 1), or the caller's positive scalar."""
    if normalizer is None:
        return valid.sum().to(dtype).clamp_min(1)
    if isinstance(normalizer, (bool, np.bool_)) or (isinstance(normalizer, torch.Tensor) and normalizer.dtype == torch.bool):
        raise ValueError(f"normalizer must be a positive finite scalar or None, got {normalizer!r} (a bool is not a number)")
    n = torch.as_tensor(normalizer, dtype=dtype, device=valid.device)
    if n.numel() != 1 or not bool(torch.isfinite(n)) or float(n) <= 0:
        raise ValueError(f"normalizer must be a positive finite scalar or None, got {normalizer!r}")
    return n.reshape(())


def loss_metrics(stats: TokenStats, weights: torch.Tensor, loss: str) -> dict:
    """Plain-float diagnostics every backend reports with the loss (docs/formulas.md §5).

    ``adv_mean`` and ``margin_mean`` over valid tokens, ``kept_fraction`` = #(valid and w > 0) / #valid,
    ``num_valid``, ``num_kept`` and, for ``reverse_kl`` / ``forward_kl``, ``reverse_kl_mean`` /
    ``forward_kl_mean``.
    """
    valid = stats.valid
    n_valid = int(valid.sum())
    n_kept = int((valid & (weights > 0)).sum())
    denom = max(n_valid, 1)
    metrics = {
        "adv_mean": float(stats.advantages.sum()) / denom,
        "margin_mean": float(stats.margins.sum()) / denom,
        "kept_fraction": n_kept / denom,
        "num_valid": n_valid,
        "num_kept": n_kept,
    }
    if loss in DIVERGENCES and getattr(stats, loss) is not None:  # TokenStats.reverse_kl / .forward_kl
        metrics[f"{loss}_mean"] = float(getattr(stats, loss).sum()) / denom
    return metrics


def reduce_loss(per_token: torch.Tensor, stats: TokenStats, weights: torch.Tensor, loss: str, normalizer) -> OPDOutput:
    """The scalar loss sum_t l_t / normaliser and the metrics, as :class:`OPDOutput` (every backend ends here).

    ``weights`` are the w_t already applied in ``per_token`` (zero at invalid positions); they only feed the
    metrics.
    """
    total = per_token.sum() / normaliser(normalizer, stats.valid, per_token.dtype)
    metrics = loss_metrics(stats, weights, loss)
    metrics["loss"] = float(total.detach())
    return OPDOutput(loss=total, per_token=per_token, stats=stats, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------
# docs/formulas.md §3-4: from the scan's release index to a segment id, and the rule's diagnostics
# ----------------------------------------------------------------------------------------------------------


def series_from_sums(sums: np.ndarray, counts: np.ndarray) -> SegmentMeans:
    """The ragged series x_j = sums[b, j] / counts[b, j] of docs/formulas.md §2 from (B, S) sums and counts.

    Segments with ``counts == 0`` are left out; ``SegmentMeans.segment_ids`` records which segment each
    entry is the mean of. The oracle (:func:`fastopd.reference.segment_means`, NumPy float64 sums) and the
    CUDA path of :class:`fastopd.ReleaseRule` (:func:`fastopd.kernels.segment_sums_triton`) both end here.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts)
    b, width = sums.shape
    present = counts.reshape(-1) > 0
    means = sums.reshape(-1)[present] / counts.reshape(-1)[present]
    seg_of_entry = np.nonzero(present)[0] % max(width, 1)
    per_row = present.reshape(b, width).sum(1)
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    return SegmentMeans(means.astype(np.float64), offsets, seg_of_entry.astype(np.int64))


def release_segment_ids(series: SegmentMeans, scan: ReleaseResult) -> np.ndarray:
    """int64 (B,): each rollout's release index r (into its series) as a segment id.

    Entry r of rollout b's series is the mean of segment ``series.segment_ids[offsets[b] + r]``; r = n (not
    accepted) maps to one past the rollout's last segment id (0 for an empty series), so "segment id < it"
    keeps every segment.
    """
    offs = series.offsets
    out = np.empty(len(scan), dtype=np.int64)
    for b in range(len(scan)):
        ids = series.segment_ids[offs[b]:offs[b + 1]]
        r = int(scan.release_index[b])
        out[b] = ids[r] if r < len(ids) else (int(ids[-1]) + 1 if len(ids) else 0)
    return out


def release_fractions(segment_ids, valid, release_segment) -> np.ndarray:
    """float64 (B,): the fraction of each rollout's valid tokens in segments before its release segment.

    The release position of docs/formulas.md §4: #(valid_t and g_t < r_seg) / #valid_t; NaN for a rollout
    with no valid token. It depends on the release point only, not on the weights a control applies.
    """
    seg = np.asarray(segment_ids.detach().cpu() if isinstance(segment_ids, torch.Tensor) else segment_ids)
    ok = np.asarray(valid.detach().cpu() if isinstance(valid, torch.Tensor) else valid).astype(bool)
    r = np.asarray(release_segment).reshape(-1, 1)
    n_valid = ok.sum(-1).astype(np.float64)
    n_before = (ok & (seg < r)).sum(-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n_before / n_valid


RELEASE_SUM_KEYS = ("rollouts", "accepted", "gain", "gain_n", "release_pos", "valid", "kept")


def release_sums(gain, accepted, release_fraction, n_valid, n_kept) -> dict:
    """Additive totals of the rule's diagnostics over some rollouts (add them up, then :func:`release_means`).

    Args:
        gain: float (R,) the scan's gains (-inf without a candidate split, NaN for a non-finite series).
        accepted: bool (R,).
        release_fraction: float (R,) :func:`release_fractions` of the same rollouts.
        n_valid, n_kept: the numbers of valid tokens and of valid tokens with w_t > 0 over them.
    """
    gain = np.asarray(gain, dtype=np.float64)
    accepted = np.asarray(accepted, dtype=bool)
    finite = np.isfinite(gain)
    return {
        "rollouts": float(len(gain)),
        "accepted": float(accepted.sum()),
        "gain": float(gain[finite].sum()),
        "gain_n": float(finite.sum()),
        "release_pos": float(np.nansum(np.asarray(release_fraction, dtype=np.float64)[accepted])),
        "valid": float(n_valid),
        "kept": float(n_kept),
    }


def release_means(sums: dict) -> dict:
    """The rule's diagnostics from :func:`release_sums` totals (summed over any number of batches).

    ``accept_rate`` = accepted / rollouts; ``gain_mean`` = mean gain over rollouts with a candidate split
    (NaN if none); ``kept_fraction`` = kept / valid tokens; ``release_position`` = mean
    :func:`release_fractions` over the accepted rollouts (NaN if none).
    """
    nan = float("nan")
    return {
        "accept_rate": sums["accepted"] / max(sums["rollouts"], 1.0),
        "gain_mean": sums["gain"] / sums["gain_n"] if sums["gain_n"] else nan,
        "kept_fraction": sums["kept"] / max(sums["valid"], 1.0),
        "release_position": sums["release_pos"] / sums["accepted"] if sums["accepted"] else nan,
    }
