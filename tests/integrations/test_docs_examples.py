"""The runnable examples of docs/integrations.md run as written (each block marked ``<!-- runnable: NAME -->``)."""

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
    exec(compile(_blocks()[name], f"{DOC.name}:{name}", "exec"), {"__name__": "__doc_example__"})
    printed = capsys.readouterr().out
    assert "opd/accept_rate" in printed and "opd/kept_fraction" in printed and "'loss'" in printed
