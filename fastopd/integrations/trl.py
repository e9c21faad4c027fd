"""fastopd's release rule inside TRL (tested with TRL 1.16): ``ReleaseDistillationTrainer`` and ``ReleaseGKDTrainer``.

Switching a TRL distillation run to the release rule is one import and the config class::

    from fastopd.integrations.trl import ReleaseDistillationConfig as DistillationConfig
    from fastopd.integrations.trl import ReleaseDistillationTrainer as DistillationTrainer

- :class:`ReleaseDistillationTrainer` subclasses ``trl.DistillationTrainer`` and replaces only
  ``_compute_loss(unwrapped_student, inputs, num_items_in_batch)``: the same last hidden states TRL's chunked
  divergence reads, both models' heads by :meth:`fastopd.LMHead.from_model` (weight, bias, logit scale,
  soft-cap by TRL's rules), into :meth:`fastopd.OPDLoss.linear` with a :class:`fastopd.ReleaseRule` -- no
  (N, V) logits. Segments come from ``self.processing_class`` on ``completion_ids`` under
  ``completion_mask`` (times ``tool_mask``). The loss is sum_t l_t / ``num_items_in_batch`` as TRL's (mean
  over the local valid tokens when it is None), and the return value is TRL's ``(loss, entropy_sum,
  n_valid)``: ``entropy_sum`` is the student's entropy at TRL's ``temperature`` summed over the valid tokens
  (:func:`fastopd.integrations.student_entropy_sum`: the head re-applied to the student's hidden states in
  chunks, no autograd, no (N, V) tensor), which TRL's ``compute_loss`` logs as ``entropy``. The rule's
  diagnostics go to TRL's metrics as ``opd/accept_rate``, ``opd/kept_fraction``, ``opd/release_position``,
  ``opd/gain_mean``, ``opd/margin_mean``,
  ``opd/adv_mean`` (and ``opd/reverse_kl_mean`` / ``opd/forward_kl_mean`` for the divergences), rank-local means per logging window.
  ``opd_mode="full"`` weights every valid token 1 and runs no rule: no segments, no BIC scan (so no
  ``opd/accept_rate``/``opd/gain_mean``; ``last_opd_output.release`` is None), and the loss takes the eager
  path of :func:`fastopd.linear_opd_loss` (gradient while each chunk's tiles are live, no recompute).
- :class:`ReleaseGKDTrainer` subclasses ``trl.experimental.gkd.GKDTrainer`` for fully on-policy GKD
  (``lmbda=1``) and computes the same loss from both models' logits (:class:`fastopd.OPDLoss`).

Options (fields of both configs, :class:`fastopd.integrations._trl_options.OPDOptions`, checked when the
config is built): ``opd_mode`` (``"release"`` or a control: ``"full"``, ``"fixed_prefix"``, ``"random"``,
``"shuffled"``), ``opd_loss`` (``"pg"``: -w_t sg(A_t) log-ratio policy gradient, ``"reverse_kl"``: w_t KL_t,
which with ``opd_mode="full"`` is TRL's ``beta=1``, or ``"forward_kl"``: w_t KL(p_T || p_S)_t, TRL's ``beta=0``), ``opd_k`` (student candidates K of the margin),
``opd_min_gain`` (BIC gain threshold), ``opd_fraction`` (for ``fixed_prefix``), ``opd_chunk_size`` (token rows
per head chunk of the hidden-state path; None: fastopd's default). TRL's ``beta`` is not used; the rule's
``random``/``shuffled`` draws are seeded by TRL's ``seed``.

TRL versions: the extra ``fastopd[trl]`` pins the tested range (``TRL_TESTED``); importing this module under
another major version of TRL is an ImportError, under a newer minor release a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastopd.integrations._trl_options import (
    OPDOptions, check_trl_version, log_opd_metrics, make_criterion, trl_import_message,
)

try:
    import trl
    from trl import DistillationConfig, DistillationTrainer
except ImportError as e:  # TRL missing, or an import error inside it (or a local trl.py shadowing it): say which
    raise ImportError(trl_import_message(e)) from e

check_trl_version(trl.__version__)

from fastopd.head import LMHead  # noqa: E402
from fastopd.integrations import completion_segments, student_entropy_sum  # noqa: E402

__all__ = ["ReleaseDistillationConfig", "ReleaseDistillationTrainer", "ReleaseGKDConfig", "ReleaseGKDTrainer"]


@dataclass
class ReleaseDistillationConfig(OPDOptions, DistillationConfig):
    """``trl.DistillationConfig`` plus the release rule's ``opd_*`` options (see the module docstring)."""


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
        self.opd_criterion = make_criterion(self.args, self.args.temperature)
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
        # With the model split across devices (device_map) the backbone can end on another device than the head,
        # as in TRL's own _compute_loss; the heads in the hidden states' dtype (the trainer's choice too).
        device = unwrapped_student.get_output_embeddings().weight.device
        student_hidden, teacher_hidden = student_hidden.to(device), teacher_hidden.to(device)
        s_head = LMHead.from_model(unwrapped_student, student_hidden.dtype)
        with torch.no_grad():
            t_head = LMHead.from_model(unwrapped_teacher, teacher_hidden.dtype)

        valid = (loss_mask != 0).to(device)
        crit = self.opd_criterion
        targets = completion_ids.to(device).masked_fill(~valid, crit.ignore_index)
        # opd_mode="full" has no rule (make_criterion): every valid token has weight 1, so no segments are
        # needed, and the loss is the eager hidden-state path (the gradient made while each chunk's tiles are live)
        segments = None if crit.rule is None else completion_segments(
            self._segment_tokenizer(), completion_ids, loss_mask).to(device)
        vs, vt = s_head.out_features, t_head.out_features
        crit.vocab_size = min(vs, vt) if vs != vt else None
        out = crit.linear(
            student_hidden, s_head, teacher_hidden, t_head, targets, segment_ids=segments,
            normalizer=num_items_in_batch, chunk_size=self.args.opd_chunk_size,
        )
        self.last_opd_output = out
        log_opd_metrics(self._metrics["train" if self.model.training else "eval"], out)
        n_valid = valid.sum()
        # TRL's compute_loss gathers this sum and logs entropy_sum / n_valid as "entropy", as for its own loss
        entropy_sum = student_entropy_sum(student_hidden.detach(), s_head, valid, self.args.temperature,
                                          self.args.opd_chunk_size)
        return out.loss, entropy_sum, n_valid


def __getattr__(name: str):
    # GKD lives in trl.experimental (which warns on import): build its classes on first use only.
    if name in ("ReleaseGKDConfig", "ReleaseGKDTrainer"):
        from fastopd.integrations import _trl_gkd

        return getattr(_trl_gkd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
