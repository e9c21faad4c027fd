"""``fastopd.opd_loss`` / ``fastopd.OPDLoss``: the OPD loss of docs/formulas.md §5.

On CUDA tensors (``backend="auto"``) the forward statistics and the gradient w.r.t. the student logits come
from the Triton kernels; otherwise the loss is the reference's plain autograd (:func:`fastopd.reference.opd_loss`,
reached through :func:`fastopd._dispatch.cpu_ops`). The per-token formula both use is :func:`fastopd.common.per_token_loss`.
"""

from __future__ import annotations

import torch
from torch import nn

from fastopd._dispatch import _device, _dtypes, cpu_ops, resolve_backend
from fastopd.common import LOSSES, reduce_loss
from fastopd.types import OPDOutput


def opd_loss(
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
    backend: str = "auto",
    inplace_backward: bool = False,
) -> OPDOutput:
    """On-policy distillation loss from logits (docs/formulas.md §5).

    Args:
        student_logits: (..., V) student logits predicting ``target_ids``; the gradient flows into them.
        teacher_logits: (..., V) teacher logits; never receive a gradient.
        target_ids: (...) sampled tokens y_t, ``ignore_index`` where not trained.
        weights: (...) per-token w_t (e.g. from :class:`fastopd.ReleaseRule`); None means the valid mask.
        loss: ``"pg"`` (importance-weighted policy gradient with the reverse-KL advantage A_t = u_t - s_t)
            or ``"reverse_kl"`` (exact dense reverse KL) or ``"forward_kl"`` (exact dense KL(p_T || p_S)).
        old_logprobs: (...) the sampler's log-probs s_old for ``pg`` (None: s_old = sg(s), rho = 1).
        normalizer: divide the summed loss by this (e.g. TRL's ``num_items_in_batch``); default the number
            of valid tokens.
        k, temperature, ignore_index, vocab_size: as in :func:`fastopd.token_stats`.
        backend: ``"auto" | "triton" | "reference"``.
        inplace_backward: Triton backend only (ignored by the reference): write dloss/dz_S into the
            student-logits buffer instead of a new tensor, saving one N x V buffer. Legal only when nothing
            else reads those logits after the loss (their values are overwritten by the backward).

    Returns:
        :class:`fastopd.OPDOutput` with the scalar ``loss``, the unreduced ``per_token`` loss, the ``stats``
        and plain-float ``metrics`` (adv_mean, margin_mean, kept_fraction, num_valid, num_kept, loss);
        ``release`` is None (it is set by :class:`OPDLoss` with a rule).

    Example:
        >>> out = fastopd.opd_loss(student_logits, teacher_logits, completion_ids, weights=rule_weights)
        >>> out.loss.backward()
    """
    kwargs = dict(
        weights=weights, loss=loss, old_logprobs=old_logprobs, normalizer=normalizer,
        k=k, temperature=temperature, ignore_index=ignore_index, vocab_size=vocab_size,
    )
    # Each backend validates its arguments itself (once): here only what the choice needs.
    if resolve_backend(backend, _device(student_logits), dtypes=_dtypes(student_logits, teacher_logits), k=k,
                       loss=loss) == "triton":
        from fastopd.kernels import opd_loss_triton

        return opd_loss_triton(student_logits, teacher_logits, target_ids, inplace_backward=inplace_backward, **kwargs)
    return cpu_ops().opd_loss(student_logits, teacher_logits, target_ids, **kwargs)


class OPDLoss(nn.Module):
    """``nn.Module`` face of :func:`opd_loss` that holds its configuration.

    With a :class:`fastopd.ReleaseRule` as ``rule``, ``forward(..., segment_ids=...)`` decides the per-token
    weights by the rule (or its control) from the margins of the loss's own forward statistics -- one read of
    the logits, not two -- weights the unreduced loss with them, and adds the rule's diagnostics (accept
    rate, mean gain, release position) to ``metrics``; ``out.release`` then holds the
    :class:`fastopd.ReleaseDecision` (it is None without a rule). With a rule, ``k``, ``temperature`` and
    ``backend`` are the rule's (set them once, on the rule); passing a different value here is an error.
    The other arguments are those of :func:`opd_loss` (``inplace_backward`` included).

    Example:
        >>> crit = fastopd.OPDLoss(rule=fastopd.ReleaseRule(k=16))
        >>> out = crit(student_logits, teacher_logits, completion_ids, segment_ids=segment_ids)
        >>> out.loss.backward()
    """

    def __init__(
        self,
        loss: str = "pg",
        *,
        k: int | None = None,
        temperature: float | None = None,
        ignore_index: int = -100,
        vocab_size: int | None = None,
        backend: str | None = None,
        inplace_backward: bool = False,
        rule=None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        defaults = {"k": 16, "temperature": 1.0, "backend": "auto"}
        given = {"k": k, "temperature": temperature, "backend": backend}
        for name, value in given.items():
            if rule is None:
                given[name] = defaults[name] if value is None else value
            elif value is not None and value != getattr(rule, name):
                raise ValueError(
                    f"OPDLoss({name}={value!r}) differs from rule.{name}={getattr(rule, name)!r}: with a rule, "
                    f"{name} is the rule's (the rule reads its margins from the loss's own statistics); set it "
                    "on the ReleaseRule only"
                )
            else:
                given[name] = getattr(rule, name)
        self.loss = loss
        self.k = given["k"]
        self.temperature = given["temperature"]
        self.ignore_index = ignore_index
        self.vocab_size = vocab_size
        self.backend = given["backend"]
        self.inplace_backward = inplace_backward
        self.rule = rule

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss!r}, k={self.k}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"backend={self.backend!r}, rule={self.rule!r}"
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target_ids: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
        segment_ids=None,
        old_logprobs: torch.Tensor | None = None,
        normalizer=None,
    ) -> OPDOutput:
        """Compute the loss; see :func:`opd_loss`. ``segment_ids`` (B, L) is needed when a rule is set."""
        self._check_rule_args(weights, segment_ids)
        out = opd_loss(
            student_logits, teacher_logits, target_ids,
            weights=weights, loss=self.loss, old_logprobs=old_logprobs, normalizer=normalizer,
            k=self.k, temperature=self.temperature, ignore_index=self.ignore_index,
            vocab_size=self.vocab_size, backend=self.backend, inplace_backward=self.inplace_backward,
        )
        if self.rule is None:
            return out
        return self._apply_rule(out.per_token, out.stats, segment_ids, normalizer)

    def _check_rule_args(self, weights, segment_ids) -> None:
        if self.rule is not None:
            if weights is not None:
                raise ValueError("pass either weights= or a rule (OPDLoss(rule=...)) with segment_ids=, not both")
            if segment_ids is None:
                raise ValueError("OPDLoss(rule=...) needs segment_ids= (B, L) from fastopd.token_segments")

    def _apply_rule(self, per_token_unit: torch.Tensor, stats, segment_ids, normalizer) -> OPDOutput:
        """The rule's weights from ``stats.margins``, applied to the unit (w = valid) per-token loss."""
        # weights=None gave l_t with w = valid; weighting that per-token loss afterwards is l_t with the rule's
        # w (every l_t is linear in w_t), and its gradient flows through per_token on either backend.
        decision = self.rule.from_margins(stats.margins, segment_ids, stats.valid)
        w = decision.weights.to(device=per_token_unit.device, dtype=per_token_unit.dtype)
        per_token = per_token_unit * w
        weighted = reduce_loss(per_token, stats, w, self.loss, normalizer)
        weighted.metrics.update(decision.metrics)
        weighted.release = decision
        return weighted

    def linear(
        self,
        student_hidden: torch.Tensor,
        student_head,
        teacher_hidden: torch.Tensor,
        teacher_head,
        target_ids: torch.Tensor,
        *,
        segment_ids=None,
        weights: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        normalizer=None,
        chunk_size: int | None = None,
    ) -> OPDOutput:
        """:meth:`forward` from final hidden states and LM heads (docs/formulas.md §6): no (N, V) logits.

        Each head is a :class:`fastopd.LMHead` (weight, bias, logit scale, soft-cap, vocabulary size; e.g.
        ``LMHead.from_model(model)``) or a bare (V', H) weight tensor. z = softcap(scale (h W[:V]^T + b[:V]))
        per model, by token chunks of ``chunk_size`` rows (:func:`fastopd.linear_opd_loss`). With a rule, its
        weights are decided from the margins of this same chunked forward and multiply the unit per-token
        loss; the backward then recomputes the student's logits per chunk (the teacher's too for
        ``reverse_kl``) with those weights in its incoming gradient -- no second statistics pass. Without a
        rule it is :func:`fastopd.linear_opd_loss` (gradient computed while the tiles are live). Gradients
        reach the student's hidden states and head (weight and bias) only.
        """
        from fastopd.linear import _run, weighted_output

        self._check_rule_args(weights, segment_ids)
        per0, stats = _run(
            student_hidden, student_head, teacher_hidden, teacher_head, target_ids, loss=self.loss,
            old_logprobs=old_logprobs, k=self.k, temperature=self.temperature, ignore_index=self.ignore_index,
            vocab_size=self.vocab_size, chunk_size=chunk_size, backend=self.backend, weights=weights,
            eager=self.rule is None,
        )
        if self.rule is None:
            return weighted_output(per0, stats, weights, self.loss, normalizer)
        return self._apply_rule(per0, stats, segment_ids, normalizer)
