"""The logits path for TRL's ``GKDTrainer`` (``trl.experimental.gkd``), fully on-policy (``lmbda=1``).

Imported on first access of ``fastopd.integrations.trl.ReleaseGKDTrainer`` / ``ReleaseGKDConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.experimental.gkd import GKDConfig, GKDTrainer

from fastopd.integrations import completion_segments
from fastopd.integrations._trl_options import OPDOptions, log_opd_metrics, make_criterion

__all__ = ["ReleaseGKDConfig", "ReleaseGKDTrainer"]


@dataclass
class ReleaseGKDConfig(OPDOptions, GKDConfig):
    """``trl.experimental.gkd.GKDConfig`` plus the release rule's ``opd_*`` options (``opd_chunk_size`` is
    unused: this path reads logits); ``lmbda`` must be 1 (on-policy)."""

    def __post_init__(self):
        super().__post_init__()  # GKDConfig's, then the opd_* checks (OPDOptions)
        if self.lmbda != 1.0:
            raise ValueError(
                f"lmbda must be 1.0 for ReleaseGKDConfig (the release rule is for on-policy rollouts), got {self.lmbda!r}"
            )


class ReleaseGKDTrainer(GKDTrainer):
    """``GKDTrainer`` whose ``compute_loss`` is fastopd's OPD loss under the release rule, from both models' logits.

    The completion is ``input_ids[:, P:]`` with P = ``inputs["prompts"].shape[1]`` (the layout GKD's on-policy
    generation writes); the loss is at temperature 1 like GKD's own, and normalised by ``num_items_in_batch`` exactly as GKD's own loss is (the
    number of valid tokens when None). ``self.last_opd_output`` holds the last :class:`fastopd.OPDOutput`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ReleaseGKDConfig):
            raise TypeError(f"args must be a fastopd.integrations.trl.ReleaseGKDConfig, got {type(self.args).__name__}")
        # GKD samples at args.temperature but computes its loss at temperature 1 (compute_loss passes none to
        # generalized_jsd_loss); the release loss follows the loss.
        self.opd_criterion = make_criterion(self.args, 1.0)
        self.last_opd_output = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        zs = student_outputs.logits[:, :-1, :]
        zt = teacher_outputs.logits[:, :-1, :]
        targets = inputs["labels"][:, 1:]
        segment_ids = None
        if self.opd_criterion.rule is not None:  # opd_mode="full" has none (make_criterion): no segments needed
            p = inputs["prompts"].shape[1]
            completion = inputs["input_ids"][:, p:]
            seg = completion_segments(self.processing_class, completion, inputs["labels"][:, p:] != -100)
            segment_ids = torch.full_like(targets, -1)
            segment_ids[:, p - 1:] = seg  # the logits at position i predict token i + 1
        out = self.opd_criterion(zs, zt, targets, segment_ids=segment_ids, normalizer=num_items_in_batch)
        self.last_opd_output = out
        log_opd_metrics(self._metrics["train" if self.model.training else "eval"], out)
        return (out.loss, student_outputs) if return_outputs else out.loss
