"""Tests of checkpoints (fastopd/train/checkpoint.py): atomic writes, keep_last, and the state a resume restores.

One process, a stand-in for accelerate's Accelerator (the calls save_checkpoint makes), a tiny random Qwen3.
The kill-and-resume run of the whole trainer is tests/train/test_trainer.py's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastopd.release import ReleaseRule
from fastopd.train import checkpoint as ck


class OneProcess(SimpleNamespace):
    """What save_checkpoint / load_training_state use of an Accelerator, for a single plain process."""

    def __init__(self):
        from accelerate.utils import DistributedType

        super().__init__(is_main_process=True, num_processes=1, process_index=0,
                         distributed_type=DistributedType.NO)

    def wait_for_everyone(self):
        pass

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model

    def print(self, *args):
        print(*args)


@pytest.fixture(scope="module")
def parts():
    from tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    return tok, make_model(tok, hidden=16, seed=3)


def _save(acc, out, step, parts, keep_last=2):
    tok, model = parts
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ck.save_checkpoint(acc, step=step, output_dir=out, student=model, tokenizer=tok, optimizer=opt,
                              scheduler=sched, rule=ReleaseRule(mode="random", seed=step), keep_last=keep_last,
                              extra={"mode": "random"})


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("crash_in", ["torch.save", "os.replace"])
def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(parts, tmp_path, monkeypatch, crash_in):
    acc = OneProcess()
    first = _save(acc, tmp_path, 1, parts)
    before = _tree(first)
    assert json.loads((first / "trainer_state.json").read_text())["step"] == 1

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if crash_in == "torch.save":  # after the student's weights, while the optimizer state is written
        real = torch.save
        monkeypatch.setattr(ck.torch, "save", lambda obj, f, *a, **k: boom() if str(f).endswith("optimizer.pt")
                            else real(obj, f, *a, **k))
    else:  # everything written and fsynced, the rename into place fails
        monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(acc, tmp_path, 2, parts)
    monkeypatch.undo()

    assert ck.list_checkpoints(tmp_path) == [(1, first)] and ck.latest_checkpoint(tmp_path) == first
    assert _tree(first) == before  # byte for byte
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")] == [".tmp-step-00000002"]
    # the next save cleans the torn folder up
    second = _save(acc, tmp_path, 2, parts)
    assert ck.latest_checkpoint(tmp_path) == second
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_only_complete_folders_count_and_keep_last(parts, tmp_path):
    acc = OneProcess()
    for step in (1, 2, 3):
        _save(acc, tmp_path, step, parts, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]
    torn = tmp_path / "checkpoints" / "step-00000009"
    torn.mkdir()  # no trainer_state.json: not a checkpoint
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]
    assert ck.list_checkpoints(tmp_path / "nothing") == [] and ck.latest_checkpoint(tmp_path / "nothing") is None


def test_resume_restores_optimizer_scheduler_and_every_random_stream(parts, tmp_path):
    tok, model = parts
    acc = OneProcess()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    sched.step()
    rule = ReleaseRule(mode="random", seed=5)
    rule.generator.random(3)
    path = ck.save_checkpoint(acc, step=7, output_dir=tmp_path, student=model, tokenizer=tok, optimizer=opt,
                              scheduler=sched, rule=rule)
    want = (random.random(), np.random.rand(), torch.rand(1).item(), rule.generator.random())

    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    rule2 = ReleaseRule(mode="random", seed=99)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert ck.load_training_state(acc, path, student=model, optimizer=opt2, scheduler=sched2, rule=rule2) == 7
    assert (random.random(), np.random.rand(), torch.rand(1).item(), rule2.generator.random()) == want
    assert sched2.get_last_lr() == sched.get_last_lr() == [5e-4]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


# ---- damaged checkpoints (issue 22): the file is named; resume falls back to the previous whole checkpoint

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage, named", [
    (lambda ck_: _truncate(ck_ / "optimizer.pt"), "optimizer.pt: truncated or damaged"),
    (lambda ck_: _truncate(ck_ / "student" / "model.safetensors"), "model.safetensors: truncated"),
    (lambda ck_: _truncate(ck_ / "student" / "model.safetensors", keep=0.0001), "model.safetensors:"),
    (lambda ck_: (ck_ / "trainer_state.json").write_text("{\"step\": "), "trainer_state.json: unreadable"),
    (lambda ck_: (ck_ / "trainer_state.json").write_text("[1, 2]"), "trainer_state.json: not a trainer state"),
    (lambda ck_: (ck_ / "trainer_state.json").write_text('{"step": "2"}'), "trainer_state.json: not a trainer"),
    (lambda ck_: _truncate(ck_ / "scheduler.pt", keep=0.9), "scheduler.pt: truncated or damaged"),
    (lambda ck_: (ck_ / "optimizer.pt").unlink(), "optimizer.pt: missing"),
])
def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(parts, tmp_path, damage, named):
    acc = OneProcess()
    first = _save(acc, tmp_path, 1, parts)
    second = _save(acc, tmp_path, 2, parts)
    assert ck.checkpoint_problem(first) is None and ck.checkpoint_problem(second) is None
    damage(second)
    problem = ck.checkpoint_problem(second)
    assert problem is not None and "\n" not in problem and named in problem and str(second) in problem
    said = []
    assert ck.resume_checkpoint(tmp_path, log=said.append) == first
    assert len(said) == 1 and named in said[0] and f"resuming from the previous checkpoint {first}" in said[0]
    # loading the damaged one directly names the file too
    tok, model = parts
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match=named.split(":")[0]):
        ck.load_training_state(acc, second, student=model, optimizer=opt, scheduler=sched)
    # every checkpoint damaged: one error naming each, no silent fresh start
    damage(first)
    with pytest.raises(ValueError) as e:
        ck.resume_checkpoint(tmp_path, log=said.append)
    assert "no usable checkpoint" in str(e.value) and str(first) in str(e.value) and str(second) in str(e.value)


def test_resume_checkpoint_of_whole_checkpoints_is_the_newest_and_says_nothing(parts, tmp_path):
    acc = OneProcess()
    _save(acc, tmp_path, 1, parts)
    newest = _save(acc, tmp_path, 2, parts)
    said = []
    assert ck.resume_checkpoint(tmp_path, log=said.append) == newest and said == []
    assert ck.resume_checkpoint(tmp_path / "none", log=said.append) is None


def test_a_torch_file_that_cannot_be_read_is_named(tmp_path):
    bad = tmp_path / "optimizer.pt"
    torch.save({"a": torch.ones(100)}, bad)
    _truncate(bad)
    with pytest.raises(ValueError, match=r"optimizer\.pt: cannot be read"):
        ck._load(bad)


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    ck.atomic_write_text(path, '{"a": 1}\n')
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["result.json"]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError):
        ck.atomic_write_text(path, '{"a": 2, "much": "longer"}\n')
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
