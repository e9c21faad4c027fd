"""The OPD loss and the release rule with the teacher on a server (docs/formulas.md §7, §7a).

A server (vLLM ``prompt_logprobs=k``; :mod:`fastopd.integrations.served_teacher`) gives, per completion token,
the teacher's log-prob of the sampled token u_t and its top-k ids and log-probs (temperature 1), never the
teacher's full distribution. From these and the student's logits (with gradient):

- ``pg``: exact. l_t = -w_t sg(A_t) rho_t with A_t = u_t - s_t needs only u_t (:func:`fastopd.common.per_token_loss`,
  the same function as the in-process loss, so the loss and its gradient are :func:`fastopd.opd_loss`'s).
- the rule's margins: :func:`fastopd.sparse_margins` from the student's top-K candidates (ties to the lower
  index, as :func:`fastopd.token_stats`) and the server's top-k: exact where at least two candidates are in the
  teacher's top-k, a lower bound elsewhere; the share of exact margins is the metric ``margin_exact_share``.
- ``forward_kl_topk`` / ``reverse_kl_topk``: the divergences restricted to the teacher's top-k, named as the
  approximations they are (:func:`topk_forward_kl`, :func:`topk_reverse_kl`; the forward one is verl's
  ``forward_kl_topk``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastopd._validate import check_k, check_per_token, check_token_inputs
from fastopd.common import per_token_loss, reduce_loss, weight_mask
from fastopd.reference import _candidate_ids, logprobs, topk_candidates
from fastopd.sparse import sparse_margins
from fastopd.types import OPDOutput, TokenStats

__all__ = ["SERVED_LOSSES", "ServedOPDOutput", "served_opd_loss", "student_candidates", "topk_forward_kl", "topk_reverse_kl"]

# The losses a served teacher supports: pg exactly, the two divergences as top-k approximations (§7a).
SERVED_LOSSES = ("pg", "reverse_kl_topk", "forward_kl_topk")


@dataclass
class ServedOPDOutput(OPDOutput):
    """:class:`fastopd.OPDOutput` plus what only a served teacher has.

    Attributes:
        margin_exact: bool (B, L), the margin is exact there (docs/formulas.md §7); False at invalid positions.
        divergence: float (B, L) the top-k divergence of a ``*_topk`` loss (detached; 0 at invalid positions),
            None for ``pg``. ``stats.reverse_kl`` / ``stats.forward_kl`` stay None: they mean the exact ones.
    """

    margin_exact: torch.Tensor | None = None
    divergence: torch.Tensor | None = None


def _teacher_terms(ls: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor):
    """(log p_S at the teacher's ids, the teacher's log-probs, present) with padding (id < 0) masked."""
    present = topk_ids >= 0
    ls_k = ls.gather(-1, topk_ids.clamp_min(0).long())
    lt_k = torch.where(present, topk_logprobs.to(ls.dtype), torch.full_like(ls_k, -math.inf))
    return ls_k, lt_k, present


def topk_forward_kl(ls: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """F~_t = sum over the teacher's top-k T_t of p_T(v) (log p_T(v) - log p_S(v)) (docs/formulas.md §7a).

    verl's ``forward_kl_topk`` (without its optional clamp and tail term): the teacher's top-k log-probs as the
    server returned them (not renormalised), the student's full-softmax log-probs ``ls`` (..., V) gathered at
    them; gradient through ``ls``. Padding ids (< 0) contribute 0, as do entries with p_T = 0.
    """
    ls_k, lt_k, present = _teacher_terms(ls, topk_ids, topk_logprobs)
    p = lt_k.exp()
    return torch.where(present & (p > 0), p * (lt_k - ls_k), torch.zeros_like(ls_k)).sum(-1)


def topk_reverse_kl(ls: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """R~_t = sum over the teacher's top-k T_t of p_S(v) (log p_S(v) - log p_T(v)) (docs/formulas.md §7a).

    The reverse KL's terms on the same support as :func:`topk_forward_kl` (the only tokens whose teacher
    log-prob the server gave), student probabilities from its full softmax, not renormalised. Padding ids
    contribute 0, as do entries with p_S = 0.
    """
    ls_k, lt_k, present = _teacher_terms(ls, topk_ids, topk_logprobs)
    p = ls_k.exp()
    return torch.where(present & (p > 0), p * (ls_k - lt_k), torch.zeros_like(ls_k)).sum(-1)


def student_candidates(z: torch.Tensor, k: int) -> torch.Tensor:
    """int64 (..., K) the student's candidates C_t (docs/formulas.md §1), in the order of
    ``fastopd.token_stats(..., return_topk=True).topk_ids`` (decreasing z, ties to the lower index).

    ``torch.topk`` gives the set unless the K-th value ties with a value left out; only those rows go through
    the reference's exact tie rule (which sorts the whole row)."""
    vals, ids = torch.topk(z, k, dim=-1)
    kth = vals[..., -1:]
    ambiguous = (z == kth).sum(-1) > (vals == kth).sum(-1)
    if bool(ambiguous.any()):
        za = z[ambiguous]
        ids[ambiguous] = _candidate_ids(za, topk_candidates(za, k), k)
    ids = ids.sort(-1).values  # then a stable sort by decreasing z: ties to the lower index
    order = torch.sort(z.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)


def _check_served(target_ids, token_logprobs, topk_ids, topk_logprobs, v: int) -> None:
    shape = tuple(target_ids.shape)
    for name, t in (("teacher_token_logprobs", token_logprobs), ("teacher_topk_logprobs", topk_logprobs)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk_ids must be an integer torch.Tensor, got {getattr(topk_ids, 'dtype', type(topk_ids).__name__)}")
    if tuple(token_logprobs.shape) != shape:
        raise ValueError(f"teacher_token_logprobs must have target_ids' shape {shape}, got {tuple(token_logprobs.shape)}")
    if topk_ids.dim() != len(shape) + 1 or tuple(topk_ids.shape[:-1]) != shape:
        raise ValueError(f"teacher_topk_ids must have shape {shape} + (k,), got {tuple(topk_ids.shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs must have teacher_topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_logprobs.shape)}"
        )
    if topk_ids.numel() and int(topk_ids.max()) >= v:
        raise ValueError(
            f"teacher_topk_ids must lie in [0, {v}) (the student's vocabulary; -1 is padding), found {int(topk_ids.max())}: "
            "is the server's model of the student's vocabulary?"
        )


def served_opd_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    loss: str = "pg",
    rule=None,
    segment_ids=None,
    weights: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    normalizer=None,
    k: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> ServedOPDOutput:
    """The OPD loss (docs/formulas.md §5) with a served teacher: its log-probs instead of its logits.

    Args:
        student_logits: (..., V) the student's logits predicting ``target_ids``; the gradient flows into them.
        target_ids: (...) sampled tokens, ``ignore_index`` where not trained.
        teacher_token_logprobs: (...) u_t = log p_T(y_t) at temperature 1 (the server's log-prob of the sampled
            token); not read at invalid positions.
        teacher_topk_ids, teacher_topk_logprobs: (..., k) the server's top-k per position (any order; id -1
            is padding).
        loss: ``"pg"`` (exact: :func:`fastopd.opd_loss`'s loss and gradient), ``"forward_kl_topk"`` or
            ``"reverse_kl_topk"`` (docs/formulas.md §7a: approximations of the divergences).
        rule: a :class:`fastopd.ReleaseRule`: its weights from the sparse margins (with ``segment_ids`` (B, L));
            its ``k`` and ``temperature`` are used. Without a rule, ``weights`` (or the valid mask).
        old_logprobs, normalizer, ignore_index, vocab_size: as :func:`fastopd.opd_loss`.
        k: the student's candidates K for the margin (default 16, or the rule's).
        temperature: must be 1 (the server's log-probs are at temperature 1: u_t at another temperature needs
            the teacher's full logits).

    Returns:
        :class:`ServedOPDOutput`: ``loss``, ``per_token``, ``stats`` (u_t, s_t, A_t, the sparse margins, the
        student's candidates in ``topk_ids``), ``margin_exact``, ``divergence``, ``release`` (with a rule) and
        ``metrics``: those of :func:`fastopd.opd_loss` (``margin_mean`` over the sparse margins), plus
        ``margin_exact_share`` (exact margins / valid tokens), ``<loss>_mean`` for a top-k loss, and the rule's.
    """
    if loss not in SERVED_LOSSES:
        raise ValueError(f"loss must be one of {SERVED_LOSSES} with a served teacher, got {loss!r}")
    if rule is not None:
        if k is not None and k != rule.k:
            raise ValueError(f"k={k!r} differs from rule.k={rule.k!r}: with a rule, k is the rule's")
        k, temperature = rule.k, rule.temperature
        if weights is not None:
            raise ValueError("pass either weights= or rule=, not both")
        if segment_ids is None:
            raise ValueError("rule= needs segment_ids= (B, L) from fastopd.token_segments")
    k = 16 if k is None else k
    check_k(k)
    if temperature != 1.0:
        raise ValueError(
            f"temperature must be 1 with a served teacher (its log-probs are at temperature 1; u_t at another "
            f"temperature needs its full logits), got {temperature!r}"
        )
    # the student's logits stand in for the teacher's: every check of the logits path except the teacher's width
    v = check_token_inputs(student_logits, student_logits, target_ids, k=k, temperature=temperature,
                           ignore_index=ignore_index, vocab_size=vocab_size)
    _check_served(target_ids, teacher_token_logprobs, teacher_topk_ids, teacher_topk_logprobs, v)
    check_per_token("weights", weights, target_ids)
    check_per_token("old_logprobs", old_logprobs, target_ids)
    if old_logprobs is not None and loss != "pg":
        raise ValueError("old_logprobs is only used by loss='pg'")
    dev = student_logits.device
    t_ids, t_lp = teacher_topk_ids.to(dev).long(), teacher_topk_logprobs.to(dev)

    valid = target_ids != ignore_index
    zs, ls = logprobs(student_logits, v, temperature)
    zero = torch.zeros((), dtype=ls.dtype, device=dev)
    with torch.no_grad():
        zd = zs.detach()
        cand = student_candidates(zd, k)
        cand = torch.where(valid.unsqueeze(-1), cand, torch.full_like(cand, -1))
        sm = sparse_margins(cand, t_ids, t_lp.to(ls.dtype), temperature=temperature)
        margins = torch.where(valid, sm.margins.to(ls.dtype), zero)
        exact = sm.exact & valid
        u = torch.where(valid, teacher_token_logprobs.to(device=dev, dtype=ls.dtype), zero)
    tgt = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long().unsqueeze(-1)
    s = ls.gather(-1, tgt).squeeze(-1)
    stats = TokenStats(
        student_logprobs=torch.where(valid, s.detach(), zero), teacher_logprobs=u,
        advantages=torch.where(valid, u - s.detach(), zero), margins=margins, valid=valid, topk_ids=cand,
    )
    decision = rule.from_margins(margins, segment_ids, valid) if rule is not None else None
    # with a rule, the unit loss (w = valid) times the rule's weights, as fastopd.OPDLoss does
    w = weight_mask(valid, weights, ls.dtype)
    divergence = None
    if loss == "pg":
        terms = per_token_loss("pg", valid, w, s=s, u=u, old_logprobs=old_logprobs)
        stats.advantages = terms.advantages
    else:
        d = (topk_forward_kl if loss == "forward_kl_topk" else topk_reverse_kl)(ls, t_ids, t_lp)
        divergence = torch.where(valid, d.detach(), zero)
        terms = per_token_loss(loss[: -len("_topk")], valid, w, kl=d)  # l_t = w_t D_t with D_t the approximation
    per_token = terms.per_token
    if decision is not None:
        w = decision.weights.to(device=dev, dtype=per_token.dtype)
        per_token = per_token * w
    out = reduce_loss(per_token, stats, w, loss, normalizer)  # a *_topk name adds no exact-divergence metric
    n_valid = max(int(valid.sum()), 1)
    out.metrics["margin_exact_share"] = int(exact.sum()) / n_valid
    if divergence is not None:
        out.metrics[f"{loss}_mean"] = float(divergence.sum()) / n_valid
    if decision is not None:
        out.metrics.update(decision.metrics)
    return ServedOPDOutput(loss=out.loss, per_token=out.per_token, stats=stats, metrics=out.metrics,
                           release=decision, margin_exact=exact, divergence=divergence)
