"""``fastopd.LMHead``: one model's LM head as the hidden-state functions take it (docs/formulas.md §6).

The head maps final hidden states h (..., H) to logits

    z = softcap(logit_scale * (h @ weight[:V].T + bias[:V])),   softcap(x) = c * tanh(x / c)  (x when c is None),

V being ``vocab_size`` (the first rows of a padded head; None: all of ``weight``'s rows), cut further to the
shared vocabulary of the two models by the functions' own ``vocab_size``. :func:`fastopd.linear_token_stats`,
:func:`fastopd.linear_opd_loss` and :meth:`fastopd.OPDLoss.linear` take an ``LMHead`` or a bare weight tensor
(read as ``LMHead(weight)``). :meth:`LMHead.from_model` reads a Hugging Face model's head: the trainer
(:mod:`fastopd.train.hidden`) and the TRL adapter build their heads with it.

Every check of a head's own fields is in :meth:`LMHead.__post_init__`; how a head fits the hidden states it
is applied to (H, dtype, device) is checked by the function that applies it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from fastopd._validate import FLOAT_DTYPES

__all__ = ["LMHead", "as_lm_head", "config_logit_scale", "unwrap_model"]


@dataclass(frozen=True, eq=False)
class LMHead:
    """One model's LM head: z = softcap(logit_scale * (h W[:V]^T + b[:V])).

    Args:
        weight: (V', H) output-embedding weight, float16/bfloat16/float32/float64. A student's gradient
            reaches it (and ``bias``) through the hidden-state loss.
        bias: optional (V',) bias in ``weight``'s dtype and device.
        logit_scale: multiplies the logits before the soft-cap (Cohere-style ``logit_scale``; Granite's
            1 / ``logits_scaling``); a finite nonzero number, 1.0 by default.
        softcap: c of the final-logit soft-cap c * tanh(z / c) (Gemma-style ``final_logit_softcapping``);
            None (default) for none, else a finite number > 0.
        vocab_size: the head's vocabulary V (the first rows of a padded ``weight``); None: all V' rows.

    Example:
        >>> head = fastopd.LMHead.from_model(model)                 # weight, bias, scale, soft-cap
        >>> fastopd.linear_opd_loss(h_s, head, h_t, teacher_lm_head.weight, completion_ids)  # or a bare weight
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"LMHead weight must be a torch.Tensor of shape (V', H), got {type(w).__name__}")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"LMHead weight must be float16, bfloat16, float32 or float64, got {w.dtype}")
        if w.dim() != 2 or w.shape[0] < 1:
            raise ValueError(f"LMHead weight must have shape (V', H) with V' >= 1, got {tuple(w.shape)}")
        b = self.bias
        if b is not None:
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"LMHead bias must be a torch.Tensor of shape (V',) or None, got {type(b).__name__}")
            if b.shape != (w.shape[0],):
                raise ValueError(f"LMHead bias must have shape (V',) = ({w.shape[0]},) like the weight's rows, "
                                 f"got {tuple(b.shape)}")
            if b.dtype != w.dtype or b.device != w.device:
                raise TypeError(f"LMHead bias must have the weight's dtype {w.dtype} and device {w.device}, "
                                f"got {b.dtype} on {b.device}")
        scale = self.logit_scale
        if (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)
                or scale == 0):
            raise ValueError(f"LMHead logit_scale must be a finite nonzero number, got {scale!r}")
        cap = self.softcap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, numbers.Real)
                                or not math.isfinite(cap) or cap <= 0):
            raise ValueError(f"LMHead softcap must be None or a finite number > 0, got {cap!r}")
        v = self.vocab_size
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= w.shape[0]):
            raise ValueError(f"LMHead vocab_size must be None or an int in [1, V'] = [1, {w.shape[0]}], got {v!r}")
        object.__setattr__(self, "logit_scale", float(scale))
        object.__setattr__(self, "softcap", None if cap is None else float(cap))
        object.__setattr__(self, "vocab_size", None if v is None else int(v))

    @property
    def out_features(self) -> int:
        """The number of logits the head makes: ``vocab_size``, or the weight's rows V' when it is None."""
        return self.weight.shape[0] if self.vocab_size is None else self.vocab_size

    def __repr__(self) -> str:
        w, b = self.weight, self.bias
        return (
            f"LMHead(weight={tuple(w.shape)} {w.dtype} on {w.device}, bias={None if b is None else tuple(b.shape)}, "
            f"logit_scale={self.logit_scale}, softcap={self.softcap}, vocab_size={self.vocab_size})"
        )

    @classmethod
    def from_model(cls, model, dtype: torch.dtype | None = None) -> LMHead:
        """The LM head of a Hugging Face model: ``get_output_embeddings()``'s weight and bias, the logit scale
        (:func:`config_logit_scale`) and ``final_logit_softcapping`` of its (text) config.

        ``model`` may be wrapped (DDP, FSDP: the ``.module`` chain is followed). Under FSDP2 the weight is a
        DTensor shard outside the wrapped forward: it is gathered with ``full_tensor()`` (differentiable, so
        a gradient is reduce-scattered back to the shard; TRL's ``_chunked_divergence_loss`` does the same).
        FSDP1's flat-parameter views are refused. ``dtype``: cast weight and bias to it (the hidden states'
        dtype under mixed precision); the cast is differentiable. A soft-cap of 0 or None in the config is
        no soft-cap; ``vocab_size`` is left None (all rows).
        """
        base = unwrap_model(model)
        get = getattr(base, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError(f"{type(base).__name__} has no output embedding (LM head) weight")
        weight, bias = head.weight, getattr(head, "bias", None)
        if weight.dim() != 2 or weight.numel() == 0:  # e.g. an FSDP1 flat-parameter view outside the forward
            raise ValueError(
                f"the LM head weight has shape {tuple(weight.shape)}, not (V, H): a sharded FSDP1 parameter? "
                "use FSDP2, or a loss from logits (the trainer's loss_from='logits')"
            )
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without distributed
            DTensor = ()
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        if isinstance(bias, DTensor):
            bias = bias.full_tensor()
        if dtype is not None:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        cfg = getattr(base, "config", None)
        if cfg is not None and callable(getattr(cfg, "get_text_config", None)):
            cfg = cfg.get_text_config()  # VLMs keep the logit post-processing on their text config
        softcap = getattr(cfg, "final_logit_softcapping", None)
        return cls(weight, bias, config_logit_scale(cfg), float(softcap) if softcap else None)


def as_lm_head(head, name: str) -> LMHead:
    """``head`` as an :class:`LMHead` (a bare weight tensor becomes ``LMHead(weight)``); errors name ``name``."""
    if isinstance(head, LMHead):
        return head
    if isinstance(head, torch.Tensor):
        try:
            return LMHead(head)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
    raise TypeError(f"{name} must be a fastopd.LMHead or a (V', H) LM-head weight tensor, got {type(head).__name__}")


def config_logit_scale(config) -> float:
    """The multiplier a model applies to its logits, by the rules of TRL's ``DistillationTrainer._compute_loss``:
    ``logit_scale``, else ``output_multiplier``, else ``lm_head_multiplier``, else 1 / ``logits_scaling``
    (``logits_scaling`` itself for ``model_type == "hyperclovax"``); 1.0 when none is set."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        ls = config.logits_scaling
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not math.isfinite(ls) or ls == 0:
            raise ValueError(f"the model's config has logits_scaling={ls!r}: its logits are divided by it, so it must "
                             "be a finite nonzero number (fix the model's config.json)")
        scale = ls if getattr(config, "model_type", None) == "hyperclovax" else 1 / ls
    return 1.0 if scale is None else float(scale)


def unwrap_model(model):
    """The model inside DDP / FSDP1 / other ``.module`` wrappers."""
    base = model
    while hasattr(base, "module"):
        base = base.module
    return base
