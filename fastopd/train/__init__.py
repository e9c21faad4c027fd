"""Thin Hugging Face trainer for on-policy distillation, plus the embedded CPU demo task (task.py, verify.py).

- :class:`TrainConfig` (config.py): every option, documented; YAML + command-line flags.
- :func:`train` (trainer.py): the whole OPD loop (rollouts, teacher scoring, release rule, AdamW, accelerate).
- :func:`evaluate` (trainer.py): greedy accuracy of a model on prompt/answer rows, graded by a verifier.
- :func:`run_demo` (demo.py): ``fastopd demo``; :func:`make_report` (report.py): the figures of finished runs.

Names are imported on first use, so ``import fastopd.train.task`` stays light.
"""

_LAZY = {
    "TrainConfig": "fastopd.train.config",
    "train": "fastopd.train.trainer",
    "evaluate": "fastopd.train.trainer",
    "run_demo": "fastopd.train.demo",
    "make_report": "fastopd.train.report",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastopd.train' has no attribute {name!r}")


__all__ = list(_LAZY)
