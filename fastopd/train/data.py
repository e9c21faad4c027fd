"""Prompt data for the trainer: loading (JSONL or a ``datasets`` dataset) and a resumable prompt order.

A row is ``{"prompt": str, "answer": str | None}``. The order in which prompts are used is a pure function of
``(seed, step, micro-batch, process)`` (:class:`PromptSchedule`), so a resumed run draws exactly the prompts
the uninterrupted run would have drawn, with no data-loader state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TABLE_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompts(source: str, *, split: str = "train", prompt_field: str = "prompt",
                 answer_field: str = "answer") -> list[dict]:
    """Read prompt rows from ``source``.

    Args:
        source: a ``.jsonl`` file (one JSON object per line), a folder written by ``datasets``'
            ``save_to_disk`` (a Dataset or a DatasetDict, from which ``split`` is taken), a ``.json`` /
            ``.csv`` / ``.parquet`` file, or else a Hugging Face hub dataset name (``load_dataset(source,
            split=split)``).
        prompt_field, answer_field: the keys / columns to read. ``answer`` is optional (None when missing).

    Returns:
        A list of ``{"prompt": str, "answer": str | None}``.

    Raises:
        FileNotFoundError / ValueError with the source and field named.
    """
    path = Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".jsonlines", ".ndjson"):
        records = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {e}") from None
    else:
        records = _load_with_datasets(source, path, split)
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or prompt_field not in rec:
            raise ValueError(f"row {i} of {source} has no `{prompt_field}` field (set prompt_field to the right key)")
        prompt = rec[prompt_field]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"row {i} of {source}: `{prompt_field}` must be a non-empty string, got {prompt!r}")
        answer = rec.get(answer_field)
        rows.append({"prompt": prompt, "answer": None if answer is None else str(answer)})
    if not rows:
        raise ValueError(f"no prompts in {source}")
    return rows


def _load_with_datasets(source: str, path: Path, split: str):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dev dependency
        raise ImportError(f"reading {source} needs the `datasets` package (pip install datasets), "
                          "or give a .jsonl file") from None
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source} has splits {list(ds)}, not `{split}` (set train_split / eval_split)")
            ds = ds[split]
    elif path.is_file():
        kind = TABLE_SUFFIXES.get(path.suffix)
        if kind is None:
            raise ValueError(f"unsupported data file {source}: use .jsonl, .json, .csv, .parquet or a datasets folder")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    elif path.suffix or source.startswith((".", "/")):
        raise FileNotFoundError(f"data not found: {source}")
    else:
        ds = datasets.load_dataset(source, split=split)  # a hub dataset name
    return list(ds)


class PromptSchedule:
    """Which prompts each process uses at each (step, micro-batch): epochs of seeded permutations.

    The global stream of prompt indices is the concatenation of permutations of ``range(n_rows)``, the e-th
    drawn from ``numpy.random.default_rng([seed, e])``. Micro-batch ``j`` of step ``s`` (1-based) takes the
    global slice starting at ``((s - 1) * accum + j) * batch * world`` and process ``rank`` takes its
    ``batch``-long part of it. No state: resuming at step s reproduces the same prompts.
    """

    def __init__(self, n_rows: int, *, seed: int, batch: int, accum: int = 1, world: int = 1, rank: int = 0):
        if n_rows < 1:
            raise ValueError(f"n_rows must be >= 1, got {n_rows}")
        self.n_rows, self.seed, self.batch, self.accum, self.world, self.rank = n_rows, seed, batch, accum, world, rank
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return self._perms[epoch]

    def indices(self, step: int, micro: int = 0) -> list[int]:
        """Row indices for this process at 1-based ``step`` and micro-batch ``micro``."""
        start = ((step - 1) * self.accum + micro) * self.batch * self.world + self.rank * self.batch
        out = []
        for g in range(start, start + self.batch):
            epoch, pos = divmod(g, self.n_rows)
            out.append(int(self._perm(epoch)[pos]))
        return out
