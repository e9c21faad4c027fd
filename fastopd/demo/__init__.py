"""The paper's embedded experiment on the shipped tiny models: ``fastopd demo`` and ``fastopd study``.

- task.py, long_task.py, check_task.py: the synthetic tasks (problems, prompts, solutions; graded by the trainer's
  ``boxed`` verifier, :mod:`fastopd.train.verify`); check_task is the one where the fade's position varies
  (its models: ``fastopd/assets/demo_check``); :func:`demo_asset_paths`: the shipped models' folders;
- precondition.py: the teacher's margin profile on the student's own rollouts, before any OPD step;
- demo.py: :func:`run_demo`, ``fastopd demo`` (full OPD against the release rule, one seed);
- study.py: :func:`run_study`, ``fastopd study`` (the rule against every control, several seeds).

It is built on :mod:`fastopd.train` (the trainer a user imports); nothing under ``fastopd/train`` imports
this package. Names are imported on first use, so ``import fastopd.demo.task`` stays light.
"""

_LAZY = {
    "run_demo": "fastopd.demo.demo",
    "run_study": "fastopd.demo.study",
    "demo_asset_paths": "fastopd.demo.task",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastopd.demo' has no attribute {name!r}")


__all__ = list(_LAZY)
