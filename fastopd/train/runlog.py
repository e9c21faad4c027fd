"""The run's JSONL logs, and the one JSONL reader of the package.

:class:`RunLog` writes ``metrics.jsonl``, ``eval.jsonl`` and ``rollouts.jsonl`` (main process only) and
truncates them on resume; :func:`read_jsonl` reads any JSONL file (the trainer's logs, prompt files).
:func:`json_line` is how every JSONL line of the package is written: strict JSON (RFC 8259), so any parser reads
it; an undefined number (NaN, or the -inf gain of a rollout too short for a split) is ``null``, which
:func:`as_float` reads back as NaN.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def read_jsonl(path: str | Path, *, missing_ok: bool = False, skip_torn: bool = False) -> list[dict]:
    """The rows (dicts) of a JSONL file, one per non-empty line.

    Args:
        missing_ok: return [] when the file does not exist (a log not written yet) instead of raising
            FileNotFoundError.
        skip_torn: skip lines that are not valid JSON (the last line of a log torn by a kill) instead of
            raising ``json.JSONDecodeError``. Data files are read strictly; logs with both flags.
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_torn:
                    raise
    return rows


def read_log(path: str | Path) -> list[dict]:
    """Rows of a run log: ``read_jsonl(path, missing_ok=True, skip_torn=True)``, each a step record (a JSON
    object with an integer ``step``); any other row (``[1, 2]``, ``{"loss": 1}``, ``{"step": "3"}``) is a
    ValueError naming the file and the row, not a KeyError in whatever reads the log."""
    rows = read_jsonl(path, missing_ok=True, skip_torn=True)
    for i, row in enumerate(rows):
        if not is_step_record(row):
            text = json.dumps(row)
            text = text if len(text) <= 80 else text[:77] + "..."
            raise ValueError(f"{path}: row {i + 1} is not a step record (a JSON object with an integer `step`): "
                             f"{text}")
    return rows


def is_step_record(row) -> bool:
    """A log row: a dict whose ``step`` is an int (not a bool)."""
    return isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool)


class RunLog:
    """The run's JSONL logs (main process): one row per training step, one per evaluation, rollouts.

    Files in ``output_dir``: ``metrics.jsonl`` (``{"step": s, ...}`` for s = 1, 2, ...), ``eval.jsonl``
    (``{"step": s, "accuracy": ...}``, s = 0 before training), ``rollouts.jsonl`` (when enabled). On resume
    at step s, :meth:`truncate` keeps only rows with step <= s (and drops a torn last line), so the logs
    of a resumed run have every step exactly once.
    """

    FILES = ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl")

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled

    def truncate(self, step: int) -> None:
        if not self.enabled:
            return
        for name in self.FILES:
            path = self.dir / name
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if not is_step_record(row):
                    raise ValueError(f"{path}: a row is not a step record (a JSON object with an integer `step`): "
                                     f"{line[:80]}")
                if row["step"] <= step:
                    kept.append(line)
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(s + "\n" for s in kept))
            os.replace(tmp, path)

    def write(self, name: str, row: dict) -> None:
        if not self.enabled:
            return
        with (self.dir / name).open("a") as f:
            f.write(json_line(row) + "\n")
            f.flush()


def json_line(row, **kwargs) -> str:
    """``row`` as one line of strict JSON: :func:`finite_json` of it, dumped with ``allow_nan=False``.

    Python's ``json.dumps`` writes NaN and infinities as the bare words ``NaN`` / ``Infinity``, which are not
    JSON and which strict parsers (``jq``, JavaScript, Go, ...) reject; here they become ``null``.
    ``kwargs`` go to ``json.dumps`` (e.g. ``ensure_ascii=False``)."""
    return json.dumps(finite_json(row), allow_nan=False, **kwargs)


def finite_json(x):
    """A copy of ``x`` that strict JSON can hold: NaN and +-inf become None; numpy scalars and arrays and
    tensors become Python numbers and lists; tuples become lists; keys and unknown objects become strings."""
    if isinstance(x, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): finite_json(v)
                for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, np.ndarray) or (type(x).__module__.startswith("torch") and hasattr(x, "tolist")):
        return finite_json(x.tolist())  # an array or a tensor (torch not imported here)
    return str(x)


def as_float(x) -> float:
    """A logged number back as a float: ``null`` (an undefined value, see :func:`json_line`) is NaN."""
    return float("nan") if x is None else float(x)
