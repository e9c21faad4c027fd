"""Atomic checkpoints and exact resume (the run's JSONL logs are :mod:`fastopd.train.runlog`).

A checkpoint is a folder ``<output_dir>/checkpoints/step-XXXXXXXX/`` holding

- ``student/``         the student, ``save_pretrained`` (safetensors) + the tokenizer: loadable on its own;
- ``optimizer.pt``     the AdamW state (FSDP: accelerate's sharded optimizer files);
- ``scheduler.pt``     the LR scheduler state;
- ``rng-rank{r}.pt``   per process: Python ``random``, NumPy's global state, torch CPU (and CUDA) generators,
                       and the release rule's NumPy generator (the ``random`` control draws from it);
- ``trainer_state.json``  ``{"step": s, ...}``: the state *after* optimizer step s.

It is written into ``checkpoints/.tmp-step-XXXXXXXX`` first, every file is fsynced, and the folder is then
renamed into place (``os.replace``) and the parent fsynced, so a ``step-*`` folder is always complete: a
process killed mid-write leaves only a ``.tmp-*`` folder, which the next save or resume deletes. Only the
last ``keep_last`` checkpoints are kept.

Resume (:func:`resume_checkpoint`, :func:`load_training_state`) restores all of the above and continues at
step s + 1. :func:`resume_checkpoint` takes the newest checkpoint whose files are whole (:func:`checkpoint_problem`:
a truncated ``optimizer.pt`` or ``model.safetensors``, a garbage ``trainer_state.json``) and says so when it falls
back to an older one; :class:`fastopd.train.runlog.RunLog` drops the log rows of steps > s written after the checkpoint, so every step
appears exactly once in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with the files of checkpoint ``path`` (one line naming the file), or None when they are whole.

    Cheap checks, no tensor is loaded: ``trainer_state.json`` is a JSON object with an integer ``step``; every
    ``*.pt`` file's zip directory (written last by ``torch.save``) is readable, which a truncated file's is not;
    every ``student/*.safetensors`` file is as long as its header says; ``student/config.json`` is JSON."""
    import zipfile

    path = Path(path)
    state = path / "trainer_state.json"
    try:
        meta = json.loads(state.read_text())
        if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
            return f"{state}: not a trainer state (a JSON object with an integer `step`)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{state}: unreadable ({type(e).__name__})"
    pts = sorted(path.glob("*.pt"))
    if not (path / "optimizer.pt").is_file() and not any(p.name.startswith("optimizer") for p in path.iterdir()):
        return f"{path / 'optimizer.pt'}: missing"
    for p in pts:
        try:
            with zipfile.ZipFile(p):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            return f"{p}: truncated or damaged ({e})"
    student = path / "student"
    try:
        json.loads((student / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{student / 'config.json'}: unreadable ({type(e).__name__})"
    weights = sorted(student.glob("*.safetensors"))
    if not weights:
        return f"{student}: no model.safetensors"
    for p in weights:
        problem = _safetensors_problem(p)
        if problem:
            return f"{p}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """None when the safetensors file is as long as its header says (8-byte length, JSON header, data)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"truncated ({size} bytes, header of {n})"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"damaged header ({type(e).__name__})"
    if size < 8 + n + end:
        return f"truncated ({size} bytes, {8 + n + end} expected)"
    return None


def resume_checkpoint(output_dir: str | Path, log=print) -> Path | None:
    """The newest checkpoint whose files are whole (:func:`checkpoint_problem`), or None when the run has none.

    A damaged newer checkpoint is skipped with a line to ``log`` naming its file and the checkpoint resumed
    instead; when every checkpoint is damaged, a ValueError naming each."""
    found = list_checkpoints(output_dir)
    problems = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log(f"warning: {'; '.join(problems)}; resuming from the previous checkpoint {path} instead")
            return path
        problems.append(problem)
    if problems:
        raise ValueError(f"no usable checkpoint to resume in {checkpoint_root(output_dir)}: {'; '.join(problems)}")
    return None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a torn one:
    a temporary file beside it, fsynced, renamed into place (``os.replace``), the folder fsynced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _load(path: Path):
    """``torch.load`` of a checkpoint file; a damaged file is a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be read ({first})") from None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (and ``path`` itself)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def rng_state(rule=None) -> dict:
    """Every random generator the training loop draws from, as a picklable dict."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rule": _rule_generator(rule).bit_generator.state if _rule_generator(rule) is not None else None,
    }
    return state


def set_rng_state(state: dict, rule=None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen = _rule_generator(rule)
    if gen is not None and state.get("rule") is not None:
        gen.bit_generator.state = state["rule"]


def _rule_generator(rule):
    """The ReleaseRule's numpy Generator (used by its ``random`` control), if any."""
    return rule.generator if rule is not None else None


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def save_checkpoint(accelerator, *, step: int, output_dir: str | Path, student, tokenizer, optimizer, scheduler,
                    rule=None, keep_last: int = 2, extra: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically (see the module docstring); every process must call it."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    state_dict = accelerator.get_state_dict(student)  # gathers a sharded (FSDP) model; collective
    if accelerator.is_main_process:
        accelerator.unwrap_model(student).save_pretrained(
            tmp / "student", state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "student")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if _is_fsdp(accelerator):
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, student, str(tmp))
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(rule), tmp / f"rng-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        meta = {"step": step, "num_processes": accelerator.num_processes, "time": time.time(), **(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str))
        fsync_tree(tmp)
        if final.exists():  # only when a run re-saves a step it already saved
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, path: str | Path, *, student, optimizer, scheduler, rule=None) -> int:
    """Restore optimizer, scheduler and RNG from checkpoint ``path`` and return its step.

    The student's weights are not loaded here: the trainer builds the student from ``path / "student"``
    before ``accelerator.prepare`` (so DDP/FSDP wrap the restored weights).
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(problem)
    meta = json.loads((path / "trainer_state.json").read_text())
    if _is_fsdp(accelerator):
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, student, str(path))
    else:
        optimizer.load_state_dict(_load(path / "optimizer.pt"))
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(_load(rng_file), rule)
    else:
        accelerator.print(f"warning: {rng_file.name} missing (the run had {meta.get('num_processes')} processes); "
                          "random streams of this process are reseeded, so sampling will not match exactly")
    return int(meta["step"])
