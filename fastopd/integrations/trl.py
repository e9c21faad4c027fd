"""fastopd's release rule inside TRL (>= 1.16): ``ReleaseDistillationTrainer`` and ``ReleaseGKDTrainer``.

Switching a TRL distillation run to the release rule is one import and the config class::

    from fastopd.integrations.trl import ReleaseDistillationConfig as DistillationConfig
    from fastopd.integrations.trl import ReleaseDistillationTrainer as DistillationTrainer

- :class:`ReleaseDistillationTrainer` subclasses ``trl.DistillationTrainer`` and replaces only
  ``_compute_loss(unwrapped_student, inputs, num_items_in_batch)``: the same last hidden states and LM heads
  TRL's chunked divergence reads (both models' backbones, logit scale, soft-cap, temperature), into
  :meth:`fastopd.OPDLoss.linear` with a :class:`fastopd.ReleaseRule` -- no (N, V) logits (on a fastopd
  without ``OPDLoss.linear``, the interim logits path of :func:`_opd_from_hidden`). Segments come from
  ``self.processing_class`` on ``completion_ids`` under ``completion_mask`` (times ``tool_mask``). The loss is
  sum_t l_t / ``num_items_in_batch`` as TRL's (mean over the local valid tokens when it is None), and the
  return value is TRL's ``(loss, entropy_sum, n_valid)``; the student's entropy is not computed by fastopd,
  so ``entropy_sum`` is NaN and TRL's logger drops the ``entropy`` entry rather than report a made-up number.
  The rule's diagnostics go to TRL's metrics as ``opd/accept_rate``, ``opd/kept_fraction``,
  ``opd/gain_mean``, ``opd/margin_mean``, ``opd/adv_mean`` (and ``opd/reverse_kl_mean`` for ``reverse_kl``),
  rank-local means per logging window.
- :class:`ReleaseGKDTrainer` subclasses ``trl.experimental.gkd.GKDTrainer`` for fully on-policy GKD
  (``lmbda=1``) and computes the same loss from both models' logits (:class:`fastopd.OPDLoss`).

Options (fields of both configs): ``opd_mode`` (``"release"`` or a control: ``"full"``, ``"fixed_prefix"``,
``"random"``), ``opd_loss`` (``"pg"``: -w_t sg(A_t) log-ratio policy gradient, or ``"reverse_kl"``: w_t KL_t,
which with ``opd_mode="full"`` is TRL's ``beta=1``), ``opd_k`` (student candidates K of the margin),
``opd_min_gain`` (BIC gain threshold), ``opd_fraction`` (for ``fixed_prefix``), ``opd_chunk_size`` (token rows
per head chunk of the hidden-state path; None: fastopd's default). TRL's ``beta`` is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

try:
    import trl
    from trl import DistillationConfig, DistillationTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fastopd.integrations.trl needs TRL >= 1.16: pip install 'fastopd[trl]' (or pip install 'trl>=1.16')"
    ) from e

from fastopd.integrations import completion_segments
from fastopd.loss import OPDLoss
from fastopd.train.hidden import logit_scale
from fastopd.reference import LOSSES
from fastopd.release import MODES, ReleaseRule

__all__ = ["ReleaseDistillationConfig", "ReleaseDistillationTrainer", "ReleaseGKDConfig", "ReleaseGKDTrainer"]

_OPD_HELP = {
    "opd_mode": f"'release' (the rule) or a control: one of {MODES}",
    "opd_loss": f"per-token loss, one of {LOSSES}",
    "opd_k": "student candidates K of the margin m_t (>= 2)",
    "opd_min_gain": "accept a release when the BIC gain exceeds this",
    "opd_fraction": "kept fraction of the 'fixed_prefix' control, in (0, 1]",
    "opd_chunk_size": "token rows per LM-head chunk of the hidden-state path (None: fastopd's default)",
}


def _check_opd_fields(cfg) -> None:
    if cfg.opd_mode not in MODES:
        raise ValueError(f"opd_mode must be one of {MODES}, got {cfg.opd_mode!r}")
    if cfg.opd_loss not in LOSSES:
        raise ValueError(f"opd_loss must be one of {LOSSES}, got {cfg.opd_loss!r}")
    if isinstance(cfg.opd_k, bool) or not isinstance(cfg.opd_k, int) or cfg.opd_k < 2:
        raise ValueError(f"opd_k must be an int >= 2, got {cfg.opd_k!r}")
    if isinstance(cfg.opd_min_gain, bool) or not isinstance(cfg.opd_min_gain, (int, float)) or math.isnan(cfg.opd_min_gain):
        raise ValueError(f"opd_min_gain must be a number (not NaN), got {cfg.opd_min_gain!r}")
    if not isinstance(cfg.opd_fraction, (int, float)) or not 0 < cfg.opd_fraction <= 1:
        raise ValueError(f"opd_fraction must be in (0, 1], got {cfg.opd_fraction!r}")
    if cfg.opd_chunk_size is not None and (not isinstance(cfg.opd_chunk_size, int) or cfg.opd_chunk_size < 1):
        raise ValueError(f"opd_chunk_size must be a positive int or None, got {cfg.opd_chunk_size!r}")


def _make_criterion(args, temperature: float) -> OPDLoss:
    rule = ReleaseRule(args.opd_mode, k=args.opd_k, temperature=temperature, min_gain=args.opd_min_gain,
                       fraction=args.opd_fraction, seed=args.seed)
    return OPDLoss(args.opd_loss, k=args.opd_k, temperature=temperature, rule=rule)


def _log_opd_metrics(metrics_store, out) -> None:
    m = out.metrics
    for key in ("accept_rate", "kept_fraction", "gain_mean", "margin_mean", "adv_mean", "reverse_kl_mean"):
        if key in m and not math.isnan(float(m[key])):  # gain_mean is NaN when no rollout has a split
            metrics_store[f"opd/{key}"].append(float(m[key]))


@dataclass
class ReleaseDistillationConfig(DistillationConfig):
    """``trl.DistillationConfig`` plus the release rule's options (see the module docstring)."""

    opd_mode: str = field(default="release", metadata={"help": _OPD_HELP["opd_mode"]})
    opd_loss: str = field(default="pg", metadata={"help": _OPD_HELP["opd_loss"]})
    opd_k: int = field(default=16, metadata={"help": _OPD_HELP["opd_k"]})
    opd_min_gain: float = field(default=10.0, metadata={"help": _OPD_HELP["opd_min_gain"]})
    opd_fraction: float = field(default=0.5, metadata={"help": _OPD_HELP["opd_fraction"]})
    opd_chunk_size: int | None = field(default=None, metadata={"help": _OPD_HELP["opd_chunk_size"]})

    def __post_init__(self):
        super().__post_init__()
        _check_opd_fields(self)


# The model's logit multiplier, one definition for the trainer and this adapter (fastopd/train/hidden.py).
_logit_scale = logit_scale


def _opd_from_hidden(criterion: OPDLoss, student_hidden, student_head, teacher_hidden, teacher_head, targets, segments,
                     *, normalizer, chunk_size, student_head_options, teacher_head_options):
    """The OPD loss with the release rule from both models' last hidden states and LM heads.

    With :meth:`fastopd.OPDLoss.linear` (the hidden-state path, issue 9) the logits are never materialised.
    **Interim path**, used only when this fastopd has no ``OPDLoss.linear``: the two heads' logits
    z = softcap(scale * (h W^T + b)) are formed in full (B, C, V) and passed to ``OPDLoss`` -- the same
    numbers, more memory. Both paths are tested (tests/integrations/test_trl.py).
    """
    s_scale, s_cap = student_head_options["logit_scale"], student_head_options["softcap"]
    t_scale, t_cap = teacher_head_options["logit_scale"], teacher_head_options["softcap"]
    if hasattr(criterion, "linear") and not _FORCE_LOGITS_PATH:
        return criterion.linear(
            student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, targets,
            segment_ids=segments, normalizer=normalizer, student_bias=student_head.bias,
            teacher_bias=teacher_head.bias, chunk_size=chunk_size,
            student_logit_scale=s_scale, teacher_logit_scale=t_scale,
            student_final_logit_softcapping=s_cap, teacher_final_logit_softcapping=t_cap,
        )

    def head(h, lin, scale, cap):
        z = torch.nn.functional.linear(h, lin.weight, lin.bias) * scale
        return z if cap is None else cap * torch.tanh(z / cap)

    zs = head(student_hidden, student_head, s_scale, s_cap)
    with torch.no_grad():
        zt = head(teacher_hidden, teacher_head, t_scale, t_cap)
    return criterion(zs, zt, targets, segment_ids=segments, normalizer=normalizer)


# Tests set this to check the interim logits path where OPDLoss.linear exists too.
_FORCE_LOGITS_PATH = False


class ReleaseDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is fastopd's OPD loss under the release rule (or a control).

    Same constructor as ``trl.DistillationTrainer``; ``args`` must be a :class:`ReleaseDistillationConfig`.
    After each loss, ``self.last_opd_output`` holds the :class:`fastopd.OPDOutput` (per-token loss, stats,
    ``release`` decision) of the last micro-batch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ReleaseDistillationConfig):
            raise TypeError(
                f"args must be a fastopd.integrations.trl.ReleaseDistillationConfig, got {type(self.args).__name__}"
            )
        self.opd_criterion = _make_criterion(self.args, self.args.temperature)
        self.last_opd_output = None

    def _segment_tokenizer(self):
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The inputs TRL's own _compute_loss builds: the full sequence, the completion's loss mask, both models'
        # last hidden states aligned to the completion tokens, and the two LM heads.
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_ids = inputs["completion_ids"]
        loss_mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        logits_to_keep = completion_ids.size(1)
        multimodal_keys = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                           "token_type_ids", "mm_token_type_ids", "image_position_ids")
        mm = {k: inputs[k] for k in multimodal_keys if k in inputs}

        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep, **mm)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher,
                input_ids, attention_mask, logits_to_keep, **mm,
            )
        s_head = unwrapped_student.get_output_embeddings()
        t_head = unwrapped_teacher.get_output_embeddings()
        device = s_head.weight.device
        student_hidden, teacher_hidden = student_hidden.to(device), teacher_hidden.to(device)
        s_cfg = unwrapped_student.config.get_text_config()
        t_cfg = unwrapped_teacher.config.get_text_config()

        valid = (loss_mask != 0).to(device)
        targets = completion_ids.to(device).masked_fill(~valid, self.opd_criterion.ignore_index)
        segments = completion_segments(self._segment_tokenizer(), completion_ids, loss_mask).to(device)
        vocab = min(s_head.weight.shape[0], t_head.weight.shape[0])
        self.opd_criterion.vocab_size = vocab if s_head.weight.shape[0] != t_head.weight.shape[0] else None
        out = _opd_from_hidden(
            self.opd_criterion, student_hidden, s_head, teacher_hidden, t_head, targets, segments,
            normalizer=num_items_in_batch, chunk_size=self.args.opd_chunk_size,
            student_head_options=dict(logit_scale=_logit_scale(s_cfg), softcap=getattr(s_cfg, "final_logit_softcapping", None)),
            teacher_head_options=dict(logit_scale=_logit_scale(t_cfg), softcap=getattr(t_cfg, "final_logit_softcapping", None)),
        )
        self.last_opd_output = out
        _log_opd_metrics(self._metrics["train" if self.model.training else "eval"], out)
        n_valid = valid.sum()
        # fastopd does not compute the student's entropy: NaN, which TRL's log() drops, not a made-up 0
        entropy_sum = torch.tensor(float("nan"), device=device)
        return out.loss, entropy_sum, n_valid


def __getattr__(name: str):
    # GKD lives in trl.experimental (which warns on import): build its classes on first use only.
    if name in ("ReleaseGKDConfig", "ReleaseGKDTrainer"):
        from fastopd.integrations import _trl_gkd

        return getattr(_trl_gkd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
