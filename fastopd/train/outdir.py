"""A run's output folder: what a new run, ``--overwrite`` and ``--resume`` check and touch.

:func:`prepare_output_dir` is the trainer's first write (main process, before any model is loaded):

- ``output_dir`` (or a folder above it) that is a file: one ValueError naming it;
- a folder that holds a run (``metrics.jsonl`` or a checkpoint) is an error unless ``resume`` or ``overwrite``;
- ``overwrite`` removes only what a run writes (:data:`RUN_FILES`, the checkpoint folders and TensorBoard's
  event files); anything else in the folder (the user's own files, with ``--output-dir .`` the working
  directory) stays;
- ``resume`` checks the settings that define the run (:data:`fastopd.train.config.RUN_FIELDS`) against the
  run's ``config.yaml`` and refuses a change (:func:`check_resume`); ``steps`` may change.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import yaml

from fastopd.train.checkpoint import CHECKPOINT_RE, checkpoint_root, list_checkpoints
from fastopd.train.config import RUN_FIELDS, TrainConfig

RUN_FILES = ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl", "metrics.jsonl.tmp", "eval.jsonl.tmp",
             "rollouts.jsonl.tmp", "config.yaml")
"""The files a run writes at the top of its output folder (the logs, their truncation temporaries, the config)."""
RUN_FOLDERS = ("final", "final.tmp")
"""The folders a run writes whole: the final student and its temporary copy."""
TRACKER_FOLDER = "fastopd"
"""TensorBoard's folder (accelerate: ``<project_dir>/<project name>``); only its event files are the run's."""


def check_output_path(output_dir: str | Path) -> None:
    """A ValueError naming ``output_dir`` when it, or a folder above it, is an existing file."""
    out = Path(output_dir)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == out else f"is under {str(p)!r}, which is a file"
            raise ValueError(f"config field `output_dir`: {str(out)!r} {what}; give a folder")


def holds_run(output_dir: str | Path) -> bool:
    out = Path(output_dir)
    return (out / "metrics.jsonl").exists() or bool(list_checkpoints(out))


def remove_run(output_dir: str | Path) -> list[Path]:
    """Delete what a run wrote in ``output_dir`` and nothing else; return the paths removed.

    Removed: :data:`RUN_FILES`, :data:`RUN_FOLDERS`, ``checkpoints/step-*`` and ``checkpoints/.tmp-step-*``
    (then ``checkpoints/`` if empty), TensorBoard's ``events.out.tfevents.*`` files under ``fastopd/`` (then the
    folders left empty)."""
    out = Path(output_dir)
    removed = []
    for name in RUN_FILES:
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    for name in RUN_FOLDERS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            removed.append(p)
    root = checkpoint_root(out)
    if root.is_dir():
        for p in root.iterdir():
            name = p.name.removeprefix(".tmp-")
            if p.is_dir() and not p.is_symlink() and CHECKPOINT_RE.match(name):
                shutil.rmtree(p)
                removed.append(p)
        _remove_if_empty(root)
    tracker = out / TRACKER_FOLDER
    if tracker.is_dir() and not tracker.is_symlink():
        for p in sorted(tracker.rglob("events.out.tfevents.*")):
            if p.is_file():
                p.unlink()
                removed.append(p)
        for d in sorted((d for d in tracker.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            _remove_if_empty(d)
        _remove_if_empty(tracker)
    return removed


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: something the run did not write is in it


def check_resume(cfg, output_dir: str | Path | None = None) -> None:
    """Refuse to resume the run in ``output_dir`` with other settings: a ValueError naming every field of
    :data:`fastopd.train.config.RUN_FIELDS` whose value differs from the run's ``config.yaml`` (``steps`` may
    grow; evaluation, logging and checkpoint settings may change). A run without ``config.yaml`` is not
    checked; a ``config.yaml`` that is not a YAML mapping is a ValueError naming it."""

    out = Path(cfg.output_dir if output_dir is None else output_dir)
    path = out / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: the run's config is not valid YAML ({type(e).__name__}); it records the "
                         "run's settings, so resuming cannot check them") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the run's config is not a YAML mapping of fields")
    diffs = setting_differences(saved, cfg)
    if diffs:
        raise ValueError(f"--resume with other settings than the run in {out} ({'; '.join(diffs)}): these define "
                         "the run (config.yaml); keep them, or train into another --output-dir")


def prepare_output_dir(cfg) -> None:
    """Check and make the output folder of a new, overwritten or resumed run (see the module docstring)."""
    out = Path(cfg.output_dir)
    check_output_path(out)
    has_run = holds_run(out)
    if cfg.overwrite and out.is_dir():
        remove_run(out)
    elif has_run and not cfg.resume:
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                              "or choose another --output-dir")
    elif cfg.resume:
        check_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)


def run_settings(cfg: "TrainConfig | dict", fields=RUN_FIELDS) -> dict:
    """``{field: value}`` of the fields that define a run (:data:`RUN_FIELDS`), from a config or a dict."""
    get = cfg.get if isinstance(cfg, dict) else (lambda name, default=None: getattr(cfg, name, default))
    return {name: get(name) for name in fields}


def setting_differences(saved: dict, cfg: "TrainConfig | dict", fields=RUN_FIELDS) -> list[str]:
    """``"lr 0.001 -> 0.002"`` for every field of ``fields`` whose value in ``cfg`` differs from ``saved``
    (a dict, e.g. a run's config.yaml). Fields ``saved`` lacks (written by an older version) are not compared;
    numbers compare as numbers (``1`` and ``1.0`` agree); local paths compare resolved (``runs/a/student`` and
    its absolute spelling agree)."""
    now = run_settings(cfg, fields)
    diffs = []
    for name in fields:
        if name not in saved:
            continue
        a, b = saved[name], now[name]
        if _same_setting(a, b):
            continue
        diffs.append(f"{name} {a!r} -> {b!r}")
    return diffs


def _same_setting(a, b) -> bool:
    if a == b:
        return True
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, str) and isinstance(b, str):
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return False
