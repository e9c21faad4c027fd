"""The runnable examples of docs/integrations.md run as written (each block marked ``<!-- runnable: NAME -->``),
and the release rule acts in them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def _blocks() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- runnable: (\w+) -->\n```python\n(.*?)```", text, flags=re.S))


def test_doc_marks_the_trainer_examples():
    assert set(_blocks()) == {"trl", "gkd", "served"}  # "served" runs in tests/integrations/test_served_teacher.py


@pytest.mark.parametrize("name", ["trl", "gkd"])
def test_doc_example_runs(name, tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl", minversion="1.16")
    monkeypatch.chdir(tmp_path)  # the examples write their output_dir into the working directory
    namespace = {"__name__": "__doc_example__"}
    exec(compile(_blocks()[name], f"{DOC.name}:{name}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "opd/accept_rate" in printed and "opd/kept_fraction" in printed and "'loss'" in printed
    # the examples train on the long task, where the rule acts: it accepts most rollouts and releases part of
    # each (the doc's measured run: every rollout accepted, about 55 % of the tokens kept)
    steps = [h for h in namespace["trainer"].state.log_history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert h["opd/accept_rate"] >= 0.75, h
        assert 0.3 < h["opd/kept_fraction"] < 0.8 and 0.3 < h["opd/release_position"] < 0.8, h
    if name == "trl":  # TRL's DistillationTrainer logs the student's entropy (GKD's does not)
        assert all(h["entropy"] is not None and h["entropy"] > 0 for h in steps)
