"""Margins m_t from a teacher *server* that returns only its top-k log-probs per position (docs/formulas.md §7).

A serving engine (vLLM ``prompt_logprobs=k``, SGLang ``top_logprobs_num=k``) scores the student's rollout and
returns, per position, the ids and log-probs of the teacher's k most likely next tokens; the teacher's full
vocabulary never exists on the trainer. The release rule's margin (docs/formulas.md §1)

    m_t = (z_T[a1] - z_T[a2]) / tau,   a1, a2 = the best and second best teacher logits among the student's
                                       top-K candidates C_t

needs the teacher's logits only as *differences between two candidates*, and the log-sum-exp cancels in a
difference of two log-probs: z_T[a] - z_T[b] = log p_T(a) - log p_T(b) (teacher log-probs at temperature 1,
which is what the engines return and what verl asks for). So :func:`sparse_margins` is exact whenever at
least two of the student's candidates lie in the teacher's top-k, and a bound otherwise -- see its docstring.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from fastopd._validate import check_temperature

__all__ = ["SparseMargins", "sparse_margins"]


class SparseMargins(NamedTuple):
    """What :func:`sparse_margins` returns, both of the leading shape ``(...)`` of the inputs.

    Attributes:
        margins: float32 (float64 for float64 log-probs) m_t where ``exact``; elsewhere a lower bound:
            ``(log p_T(c) - log p_T(k-th)) / tau`` when exactly one candidate c is in the teacher's top-k,
            and 0 when none is; NaN where the teacher's log-probs hold a NaN or +inf.
        exact: bool, at least two of the student's candidates lie in the teacher's top-k (padding ids never
            count) and the log-probs are usable.
    """

    margins: torch.Tensor
    exact: torch.Tensor


def _check(student_topk_ids, teacher_topk_ids, teacher_topk_logprobs, temperature) -> None:
    for name, t in (("student_topk_ids", student_topk_ids), ("teacher_topk_ids", teacher_topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integer token ids, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64/int32), got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have shape (..., K), got a 0-d tensor")
    if not isinstance(teacher_topk_logprobs, torch.Tensor):
        raise TypeError(
            f"teacher_topk_logprobs must be a torch.Tensor of shape (..., k), got {type(teacher_topk_logprobs).__name__}"
        )
    if not teacher_topk_logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_topk_logprobs must be a float tensor, got {teacher_topk_logprobs.dtype}")
    if student_topk_ids.shape[-1] < 2:
        raise ValueError(
            f"student_topk_ids must hold K >= 2 candidates per position (shape (..., K)), got K = "
            f"{student_topk_ids.shape[-1]}"
        )
    if teacher_topk_ids.shape[-1] < 1:
        raise ValueError("teacher_topk_ids must hold k >= 1 ids per position (shape (..., k)), got k = 0")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs must have the shape of teacher_topk_ids {tuple(teacher_topk_ids.shape)}, "
            f"got {tuple(teacher_topk_logprobs.shape)}"
        )
    if student_topk_ids.shape[:-1] != teacher_topk_ids.shape[:-1]:
        raise ValueError(
            f"student_topk_ids (..., K) and teacher_topk_ids (..., k) must share the leading shape, got "
            f"{tuple(student_topk_ids.shape)} and {tuple(teacher_topk_ids.shape)}"
        )
    devices = {student_topk_ids.device, teacher_topk_ids.device, teacher_topk_logprobs.device}
    if len(devices) != 1:
        raise ValueError(f"student_topk_ids, teacher_topk_ids and teacher_topk_logprobs must be on one device, got {devices}")
    check_temperature(temperature)
    _check_distinct("student_topk_ids", student_topk_ids)
    _check_distinct("teacher_topk_ids", teacher_topk_ids)


def _check_distinct(name: str, ids: torch.Tensor) -> None:
    """The ids of one position (last dim) must be distinct, negative ids (padding) aside: a top-k list holds
    each token once, so a repeat is the caller's bug (it would count one candidate twice)."""
    srt = ids.long().sort(dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if not bool(dup.any()):
        return
    flat = dup.reshape(-1, dup.shape[-1])
    row = int(flat.any(-1).nonzero()[0, 0])
    where = tuple(int(i) for i in np.unravel_index(row, ids.shape[:-1])) if ids.dim() > 1 else ()
    value = int(srt.reshape(-1, srt.shape[-1])[row, 1:][flat[row]][0])
    raise ValueError(
        f"{name} must hold distinct ids at each position (negative ids are padding), but position {where} holds "
        f"{value} more than once: {ids.reshape(-1, ids.shape[-1])[row].tolist()}"
    )


def sparse_margins(
    student_topk_ids: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> SparseMargins:
    """The release rule's margin m_t from the teacher's top-k log-probs only (docs/formulas.md §7).

    Args:
        student_topk_ids: (..., K) int, the student's top-K candidates C_t (K >= 2; e.g.
            ``fastopd.token_stats(..., return_topk=True).topk_ids`` or ``torch.topk(student_logits, K).indices``).
            Distinct at each position; negative ids are padding (no candidate; ``token_stats`` writes -1 at
            ignored positions).
        teacher_topk_ids: (..., k) int, the ids of the teacher's k most likely tokens at each position (any
            order), as a vLLM/SGLang server returns them. Distinct at each position; negative ids are padding
            (a position with fewer than k entries), their log-probs are not read.
        teacher_topk_logprobs: (..., k) float, their log-probs log p_T at temperature 1 (log softmax of the
            raw teacher logits -- what the engines return for ``prompt_logprobs``).
        temperature: tau of the rule; m_t is divided by it, as in :func:`fastopd.token_stats`.

    Returns:
        :class:`SparseMargins` ``(margins, exact)`` of the leading shape ``(...)``. Let c_1, c_2 be the
        student's candidates with the largest and second largest teacher log-prob, and lp_k the smallest of
        the k log-probs given (the teacher's k-th). A candidate outside the teacher's top-k has
        log p_T <= lp_k.

        - two or more candidates inside the top-k: ``exact`` is True and ``margins`` is m_t exactly, since
          then c_1 and c_2 are both inside (anything outside is <= lp_k <= c_2) and
          z_T[c_1] - z_T[c_2] = log p_T(c_1) - log p_T(c_2). Equal log-probs give 0, as in the reference.
        - exactly one candidate c inside: ``margins`` = (log p_T(c) - lp_k) / tau, a **lower bound** of
          m_t (the best outside candidate has log p_T <= lp_k; how far below is not known, so no upper
          bound exists).
        - no candidate inside: ``margins`` = 0, the trivial lower bound (m_t >= 0 always): the server says
          nothing about how the teacher ranks the student's candidates among themselves. 0 rather than NaN
          so the release rule's segment means stay finite; to leave these tokens out instead, pass
          ``valid & exact`` as the rule's valid mask (``ReleaseRule.from_margins``).

        Padding ids never match, so they never make a margin exact, and lp_k is over the teacher's
        non-padding entries. A NaN or +inf among those log-probs gives ``margins`` NaN and ``exact`` False at
        that position (the rule then keeps that rollout whole, docs/formulas.md §3). A repeated
        non-negative id within a position of either ids tensor is a ``ValueError``.

    Example:
        >>> cand = torch.topk(student_logits, 16, dim=-1).indices                 # (B, L, 16)
        >>> out = fastopd.sparse_margins(cand, server_ids, server_logprobs)     # (B, L, k) each
        >>> decision = fastopd.ReleaseRule().from_margins(out.margins, segment_ids, valid)
    """
    _check(student_topk_ids, teacher_topk_ids, teacher_topk_logprobs, temperature)
    dtype = torch.float64 if teacher_topk_logprobs.dtype == torch.float64 else torch.float32
    lp = teacher_topk_logprobs.to(dtype)
    s_ids, t_ids = student_topk_ids.long(), teacher_topk_ids.long()
    t_present = t_ids >= 0  # negative ids: padding, absent on either side
    neg_inf = torch.tensor(-math.inf, dtype=dtype, device=lp.device)
    # (..., K, k): candidate i of the student is teacher entry j
    match = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)) & (s_ids >= 0).unsqueeze(-1) & t_present.unsqueeze(-2)
    lp_cand = torch.where(match, lp.unsqueeze(-2), neg_inf).amax(-1)  # (..., K), -inf outside the top-k
    n_inside = match.any(-1).sum(-1)
    top2 = torch.topk(lp_cand, 2, dim=-1).values
    a1, a2 = top2[..., 0], top2[..., 1]
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    exact_m = torch.where(a1 == a2, zero, (a1 - a2) / temperature)
    kth = torch.where(t_present, lp, torch.full_like(lp, math.inf)).amin(-1)  # the k-th over real entries
    one_m = torch.where(a1 == kth, zero, (a1 - kth) / temperature).clamp_min(0)
    broken = (t_present & (torch.isnan(lp) | (lp == math.inf))).any(-1)  # no log-prob: NaN, never exact
    exact = (n_inside >= 2) & ~broken
    margins = torch.where(exact, exact_m, torch.where(n_inside == 1, one_m, zero))
    margins = torch.where(broken, torch.full_like(margins, math.nan), margins)
    return SparseMargins(margins, exact)
