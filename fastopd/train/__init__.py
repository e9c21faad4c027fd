"""Thin Hugging Face trainer for on-policy distillation: what a user distilling their own models imports.

- :class:`TrainConfig` (config.py): every option, documented; YAML + command-line flags.
- :func:`train` (trainer.py): the whole OPD loop (rollouts, teacher scoring, release rule, AdamW, accelerate).
- models.py: model and tokenizer loading, the vocabulary check; rollouts.py: sampling, segments, logits;
  hidden.py: the loss from final hidden states; data.py, checkpoint.py, runlog.py: prompts, checkpoints, logs.
- :func:`evaluate` (rollouts.py): greedy accuracy of a model on prompt/answer rows, graded by a verifier
  (verify.py).
- :func:`make_report` (report.py): the figures of finished runs (``fastopd report``).

The paper's embedded experiment (``fastopd demo``, ``fastopd study``) is :mod:`fastopd.demo`, built on this
package; nothing here imports it. Names are imported on first use, so ``import fastopd.train.config`` stays
light.
"""

_LAZY = {
    "TrainConfig": "fastopd.train.config",
    "train": "fastopd.train.trainer",
    "evaluate": "fastopd.train.rollouts",
    "make_report": "fastopd.train.report",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastopd.train' has no attribute {name!r}")


__all__ = list(_LAZY)
