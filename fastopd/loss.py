"""``fastopd.opd_loss`` / ``fastopd.OPDLoss``: the OPD loss of docs/formulas.md §5.

On CUDA tensors (``backend="auto"``) the forward statistics and the gradient w.r.t. the student logits come
from the Triton kernels; otherwise the loss is the reference's plain autograd (:func:`fastopd.reference.opd_loss`,
reached through :func:`fastopd._dispatch.cpu_ops`). The per-token formula both use is :func:`fastopd.common.per_token_loss`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastopd._dispatch import _device, _dtypes, cpu_ops, resolve_backend
from fastopd.common import LOSSES, reduce_loss
from fastopd.head import LMHead
from fastopd.linear import run_chunks, weighted_output
from fastopd.options import StatsOptions
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
    options: StatsOptions | None = None,
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
        options: a :class:`fastopd.StatsOptions` instead of k, temperature, ignore_index, vocab_size, backend
            (as in :func:`fastopd.token_stats`).
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
    opts = StatsOptions.of(options, k=k, temperature=temperature, ignore_index=ignore_index,
                           vocab_size=vocab_size, backend=backend)
    return _opd_loss(student_logits, teacher_logits, target_ids, opts, weights=weights, loss=loss,
                     old_logprobs=old_logprobs, normalizer=normalizer, inplace_backward=inplace_backward)


def _opd_loss(student_logits, teacher_logits, target_ids, opts: StatsOptions, *, weights, loss, old_logprobs,
              normalizer, inplace_backward) -> OPDOutput:
    """:func:`opd_loss` with its options already built: the backend's loss."""
    kwargs = dict(weights=weights, loss=loss, old_logprobs=old_logprobs, normalizer=normalizer, options=opts)
    # Each backend validates the tensors itself (once): here only what the choice needs.
    if resolve_backend(opts.backend, _device(student_logits), dtypes=_dtypes(student_logits, teacher_logits),
                       k=opts.k, loss=loss) == "triton":
        from fastopd.kernels import opd_loss_triton

        return opd_loss_triton(student_logits, teacher_logits, target_ids, inplace_backward=inplace_backward, **kwargs)
    return cpu_ops().opd_loss(student_logits, teacher_logits, target_ids, **kwargs)


def _options_field(name: str) -> property:
    """A field of ``self.options`` as an attribute; setting it replaces the options (checked again)."""

    def get(self):
        return getattr(self.options, name)

    def set(self, value):
        self.options = dataclasses.replace(self.options, **{name: value})

    return property(get, set, doc=f"``options.{name}`` (:class:`fastopd.StatsOptions`).")


class OPDLoss(nn.Module):
    """``nn.Module`` face of :func:`opd_loss` that holds its configuration.

    With a :class:`fastopd.ReleaseRule` as ``rule``, ``forward(..., segment_ids=...)`` decides the per-token
    weights by the rule (or its control) from the margins of the loss's own forward statistics -- one read of
    the logits, not two -- weights the unreduced loss with them, and adds the rule's diagnostics (accept
    rate, mean gain, release position) to ``metrics``; ``out.release`` then holds the
    :class:`fastopd.ReleaseDecision` (it is None without a rule). The other arguments are those of
    :func:`opd_loss` (``inplace_backward`` included).

    The loss owns its :class:`fastopd.StatsOptions` (``self.options``; ``self.k`` etc. read it), built once here
    from ``options=`` or the keywords. The rule's margins come from the loss's own statistics, so ``k``,
    ``temperature`` and ``backend`` must be the rule's: without ``options=``, each of these keywords left at
    None is taken from ``rule.options``; a value given (as a keyword, or in ``options=``) that differs from
    the rule's is a ``ValueError`` naming the field. Without a rule they default to 16, 1.0 and ``"auto"``. A
    keyword given together with ``options=`` must agree with it. ``segment_ids=`` without a rule is an error
    (nothing would read them).

    Example:
        >>> crit = fastopd.OPDLoss(rule=fastopd.ReleaseRule(k=16))
        >>> out = crit(student_logits, teacher_logits, completion_ids, segment_ids=segment_ids)
        >>> out.loss.backward()
    """

    k = _options_field("k")
    temperature = _options_field("temperature")
    ignore_index = _options_field("ignore_index")
    vocab_size = _options_field("vocab_size")
    backend = _options_field("backend")

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
        options: StatsOptions | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        shared = {"k": k, "temperature": temperature, "backend": backend}  # None: not given
        if options is not None:
            # the keywords given with options= must agree with it (as StatsOptions.of checks them)
            StatsOptions.of(options, ignore_index=ignore_index, vocab_size=vocab_size,
                            **{name: v for name, v in shared.items() if v is not None})
            shared = {name: getattr(options, name) for name in shared}
        if rule is not None:
            for name, value in shared.items():
                theirs = getattr(rule.options, name)
                if value is not None and value != theirs:
                    raise ValueError(
                        f"OPDLoss({name}={value!r}) differs from rule.{name}={theirs!r}: with a rule, {name} is the "
                        "rule's (the rule reads its margins from the loss's own statistics); set it on the "
                        "ReleaseRule only"
                    )
                shared[name] = theirs
        given = {name: v for name, v in shared.items() if v is not None}
        if options is None:
            self.options = StatsOptions(ignore_index=ignore_index, vocab_size=vocab_size, **given)
        else:
            self.options = dataclasses.replace(options, **given) if given else options
        self.loss = loss
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
        out = _opd_loss(
            student_logits, teacher_logits, target_ids, self.options,
            weights=weights, loss=self.loss, old_logprobs=old_logprobs, normalizer=normalizer,
            inplace_backward=self.inplace_backward,
        )
        if self.rule is None:
            return out
        return self._apply_rule(out.per_token, out.stats, segment_ids, normalizer)

    def _check_rule_args(self, weights, segment_ids) -> None:
        if self.rule is None and segment_ids is not None:
            raise ValueError("segment_ids= is read only by a release rule (OPDLoss(rule=fastopd.ReleaseRule(...))); "
                             "without a rule pass weights= (or nothing: w = valid)")
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
        ``chunk_size`` None: ``self.options.chunk_size`` (None: :func:`fastopd.linear.default_chunk_size`).

        Each head is a :class:`fastopd.LMHead` (weight, bias, logit scale, soft-cap, vocabulary size; e.g.
        ``LMHead.from_model(model)``) or a bare (V', H) weight tensor. z = softcap(scale (h W[:V]^T + b[:V]))
        per model, by token chunks of ``chunk_size`` rows (:func:`fastopd.linear_opd_loss`). With a rule, its
        weights are decided from the margins of this same chunked forward and multiply the unit per-token
        loss; the backward then recomputes the student's logits per chunk (the teacher's too for
        ``reverse_kl``) with those weights in its incoming gradient -- no second statistics pass. Without a
        rule it is what :func:`fastopd.linear_opd_loss` runs (gradient computed while the tiles are live).
        Gradients reach the student's hidden states and head (weight and bias) only.
        """
        self._check_rule_args(weights, segment_ids)
        opts = self.options if chunk_size is None else dataclasses.replace(self.options, chunk_size=chunk_size)
        per0, stats = run_chunks(
            student_hidden, student_head, teacher_hidden, teacher_head, target_ids, opts, loss=self.loss,
            old_logprobs=old_logprobs, weights=weights, eager=self.rule is None,
        )
        if self.rule is None:
            return weighted_output(per0, stats, weights, self.loss, normalizer)
        return self._apply_rule(per0, stats, segment_ids, normalizer)


def linear_opd_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead | torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead | torch.Tensor,
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
    chunk_size: int | None = None,
    backend: str = "auto",
    options: StatsOptions | None = None,
) -> OPDOutput:
    """:func:`fastopd.opd_loss` on z = softcap(scale (h W[:V]^T + b[:V])) per model, by token chunks (§5, §6).

    ``pg``: l_t = -w_t sg(A_t) rho_t with rho_t = exp(s_t - sg(s_old_t)), A_t = u_t - s_old_t; ``reverse_kl``:
    l_t = w_t KL_t; ``forward_kl``: l_t = w_t KL(p_T || p_S)_t; loss = sum_t l_t / normaliser (default: the
    number of valid tokens). The gradient flows into ``student_hidden`` and the student head's weight and bias
    (rows >= V get 0); the teacher's tensors, ``weights`` and ``old_logprobs`` get none. Peak extra memory is
    O(chunk_size * V), independent of N. Heads are :class:`fastopd.LMHead` or bare weights; the other arguments
    as in :func:`fastopd.linear_token_stats` and :func:`fastopd.opd_loss` (``options``: a
    :class:`fastopd.StatsOptions` instead of the keywords); returns :class:`fastopd.OPDOutput`.

    It is ``OPDLoss(loss, options=...).linear(...)`` (no rule), the one hidden-state loss path.

    Example:
        >>> out = fastopd.linear_opd_loss(h_s, fastopd.LMHead.from_model(student), h_t, lm_head_t.weight, completion_ids)
        >>> out.loss.backward()   # grads in h_s (and the student's graph behind it) and the student's head
    """
    opts = StatsOptions.of(options, k=k, temperature=temperature, ignore_index=ignore_index,
                           vocab_size=vocab_size, chunk_size=chunk_size, backend=backend)
    return OPDLoss(loss, options=opts).linear(
        student_hidden, student_head, teacher_hidden, teacher_head, target_ids,
        weights=weights, old_logprobs=old_logprobs, normalizer=normalizer,
    )
