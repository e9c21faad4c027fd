"""Tests of the run's JSONL logs (fastopd/train/runlog.py): strict JSON, resume truncation, the reader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastopd.train.runlog import RunLog, as_float, finite_json, json_line, read_jsonl, read_log
from helpers import strict_jsonl


def test_the_strict_parser_refuses_what_json_dumps_writes_by_default(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"gain": -math.inf}) + "\n")
    with pytest.raises(ValueError, match="-Infinity"):
        strict_jsonl(tmp_path / "x.jsonl")


def test_undefined_numbers_are_written_as_null(tmp_path):
    log = RunLog(tmp_path)
    row = {"step": 1, "gain": -math.inf, "loss": float("nan"), "up": math.inf, "ok": 0.25, "n": 3, "flag": True,
           "np": np.float32("nan"), "npi": np.int64(7), "arr": np.array([1.5, np.inf]), "t": torch.tensor([-np.inf, 2.0]),
           "nested": {"m": [1.0, float("nan"), (2, -math.inf)]}, "correct": None, "text": "NaN Infinity"}
    for name in RunLog.FILES:
        log.write(name, row)
    for name in RunLog.FILES:
        (got,) = strict_jsonl(tmp_path / name)
        assert got == {"step": 1, "gain": None, "loss": None, "up": None, "ok": 0.25, "n": 3, "flag": True, "np": None,
                       "npi": 7, "arr": [1.5, None], "t": [None, 2.0], "nested": {"m": [1.0, None, [2, None]]},
                       "correct": None, "text": "NaN Infinity"}
        assert read_log(tmp_path / name) == [got]
    assert math.isnan(as_float(None)) and as_float(0.5) == 0.5 and as_float(3) == 3.0


def test_json_line_is_json_dumps_for_finite_rows():
    row = {"prompt": "Q: 5 × 3?", "answer": "15", "k": [1, 2], "x": 1e-300, "b": False}
    assert json_line(row) == json.dumps(row)
    assert json_line(row, ensure_ascii=False) == json.dumps(row, ensure_ascii=False)
    assert finite_json((np.bool_(True), np.float64(2.5))) == [True, 2.5]


def test_runlog_truncate_drops_later_and_torn_rows(tmp_path):
    log = RunLog(tmp_path)
    for s in (1, 2, 3, 4):
        log.write("metrics.jsonl", {"step": s})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a line torn by a kill
    log.truncate(2)
    assert [r["step"] for r in read_log(tmp_path / "metrics.jsonl")] == [1, 2]


def test_read_jsonl_strict_for_data_and_lenient_for_logs(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(p)
    assert read_jsonl(p, skip_torn=True) == [{"a": 1}]
    assert read_log(tmp_path / "missing.jsonl") == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("row", ['[1, 2]', '{"loss": 0.5}', '{"step": "3"}', '{"step": true}', '7', '"text"'])
def test_a_log_row_that_is_not_a_step_record_is_one_line_naming_the_file(tmp_path, row):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n' + row + "\n" + '{"step": 2}\n')
    with pytest.raises(ValueError) as e:
        read_log(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: row 2 is not a step record")
    with pytest.raises(ValueError, match="not a step record"):
        RunLog(tmp_path).truncate(1)  # resuming reads the logs too
