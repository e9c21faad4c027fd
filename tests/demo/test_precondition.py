"""fastopd/demo/precondition.py: the precondition's figures from per-rollout records (hand-checked values)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fastopd.demo.precondition import TARGETS, format_precondition, summarise_records
from fastopd.train.runlog import RunLog, read_log
from helpers import strict_jsonl


def _rec(margins, segments, gain, accepted, release_segment, kept_fraction):
    return {"step": 0, "length": len(margins), "margins": margins, "segments": segments, "series": [1.0] * 4,
            "gain": gain, "accepted": accepted, "release_segment": release_segment, "kept_fraction": kept_fraction,
            "correct": None, "text": ""}


def test_summary_of_hand_made_records():
    # rollout a: margins 3,3,1,1 (mean 2 -> normalised 1.5,1.5,.5,.5), 4 segments, released at segment 2
    a = _rec([3.0, 3.0, 1.0, 1.0], [0, 1, 2, 3], 20.0, True, 2, 0.5)
    # rollout b: flat margins (normalised 1 everywhere), no candidate split, keeps everything
    b = _rec([2.0] * 8, [0, 0, 1, 1, 2, 2, 3, 3], -math.inf, False, 4, 1.0)
    s = summarise_records([a, b], bins=4)
    assert s["margin_first_quarter"] == pytest.approx((1.5 + 1.0) / 2)
    assert s["margin_last_quarter"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["margin_ratio"] == pytest.approx(1.25 / 0.75)
    assert s["accept_rate"] == 0.5
    assert s["gain_mean"] == 20.0  # -inf (no candidate) is left out
    assert s["release_position"] == pytest.approx(0.5)  # tokens before segment 2 in rollout a
    assert s["kept_fraction"] == pytest.approx((2 + 8) / 12)
    assert s["rollouts"] == 2 and s["mean_length"] == 6
    text = format_precondition({**s, "min_gain": 10.0})
    assert "= 1.67" in text and f"target >= {TARGETS['margin_ratio']}: meets" in text
    assert "accept rate at min_gain 10 50.0%" in text and "meets" in text
    assert "4 bins from the start" in text and "bins" not in format_precondition({**s, "min_gain": 10.0, "profile": None})
    s20 = summarise_records([a, b], bins=20)
    assert len(s20["profile"]["mean"]) == 20 and "20 bins from the start" in format_precondition({**s20, "min_gain": 10})


def test_summary_rejects_no_records():
    with pytest.raises(ValueError, match="records"):
        summarise_records([])


def test_records_read_back_from_strict_jsonl_give_the_same_summary(tmp_path):
    """rollouts.jsonl holds null for the -inf gain of a rollout without a candidate split and for the NaN kept
    fraction of an empty one; the summary of the records read back equals that of the records in memory."""
    a = _rec([3.0, 3.0, 1.0, 1.0], [0, 1, 2, 3], 20.0, True, 2, 0.5)
    b = _rec([2.0] * 8, [0, 0, 1, 1, 2, 2, 3, 3], -math.inf, False, 4, 1.0)
    empty = _rec([], [], -math.inf, False, 0, math.nan)
    log = RunLog(tmp_path)
    for r in (a, b, empty):
        log.write("rollouts.jsonl", r)
    back = strict_jsonl(tmp_path / "rollouts.jsonl")
    assert back[1]["gain"] is None and back[2]["kept_fraction"] is None and back == read_log(tmp_path / "rollouts.jsonl")
    got, want = summarise_records(back), summarise_records([a, b, empty])
    assert got.keys() == want.keys()
    for key in want:
        if key == "profile":
            for part in ("x", "mean", "half"):
                np.testing.assert_array_equal(got[key][part], want[key][part])
        else:
            assert got[key] == pytest.approx(want[key], nan_ok=True), key
    assert got["gain_mean"] == 20.0 and got["kept_fraction"] == pytest.approx((2 + 8) / 12)
