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


def _check_rec(text, accepted, release_segment):
    """A record whose segments are the text's sentences, one token each (enough for the split's figures)."""
    from fastopd.segment import sentence_spans

    n = len(sentence_spans(text))
    return _rec([1.0] * n, list(range(n)), 20.0 if accepted else 1.0, accepted, release_segment if accepted else n,
                1.0) | {"text": text}


DERIV = "We add the numbers from left to right. 1 plus 2 is 3. 3 plus 4 is 7. The sum is \\boxed{7}."
CHECK = " Now we check 2 steps. Step 1 is right. Line 2 looks fine. So the sum is good."


def test_rule_decision_names_what_the_rule_did_against_the_true_fade():
    from fastopd.demo.precondition import fade_segment, rule_decision

    assert fade_segment(DERIV) == 4 and fade_segment(DERIV + CHECK) == 4 and fade_segment("1 plus 2 is 3.") is None
    assert rule_decision(_check_rec(DERIV, False, 0))["kind"] == "kept whole"
    assert rule_decision(_check_rec(DERIV, True, 2))["kind"] == "false release"
    assert rule_decision(_check_rec(DERIV + CHECK, False, 0))["kind"] == "missed fade"
    on = rule_decision(_check_rec(DERIV + CHECK, True, 4))
    assert on["kind"] == "on time" and on["offset"] == 0
    assert on["fade_fraction"] == pytest.approx(4 / 8) and on["release_fraction"] == pytest.approx(4 / 8)
    assert rule_decision(_check_rec(DERIV + CHECK, True, 2))["kind"] == "early"
    late = rule_decision(_check_rec(DERIV + CHECK, True, 6))
    assert late["kind"] == "late" and late["offset"] == 2
    assert rule_decision(_check_rec("We add. 1 plus 2 is 3.", True, 1))["kind"] == "no answer"


def test_check_split_accept_rates_and_release_spread():
    from fastopd.demo.precondition import CHECK_TARGETS, format_check_split, summarise_check_split

    recs = [_check_rec(DERIV + CHECK, True, 4), _check_rec(DERIV + CHECK, True, 6),
            _check_rec(DERIV + CHECK, False, 0), _check_rec(DERIV, False, 0), _check_rec(DERIV, True, 2)]
    with_check = [True, True, True, False, False]
    c = summarise_check_split(recs, with_check)
    assert c["accept_with_check"] == pytest.approx(2 / 3) and c["accept_without_check"] == pytest.approx(0.5)
    # accepted release fractions: 4/8, 6/8, 2/4 -> quartiles of [0.5, 0.5, 0.75]
    assert c["release_accepted"]["n"] == 3 and c["release_accepted"]["iqr"] == pytest.approx(0.125)
    assert c["release_all"]["n"] == 5
    assert c["decisions"] == {"on time": 1, "late": 1, "missed fade": 1, "kept whole": 1, "false release": 1}
    assert c["offset_segments_mean"] == pytest.approx(1.0)
    assert c["accept_check_written"] == pytest.approx(2 / 3) and c["rollouts_check_written"] == 3
    assert c["accept_no_check_written"] == pytest.approx(1 / 2) and c["rollouts_no_check_written"] == 2
    fixed = summarise_check_split(recs, with_check, fixed_fraction=0.6)["fixed_cut"]
    # fades of the written checks at 4/8 of each: a cut at 0.6 is after all of them, 0.1 from each
    assert fixed["cuts_derivation"] == 0.0 and fixed["mean_abs"] == pytest.approx(0.1)
    assert fixed["dropped_without_check"] == pytest.approx(0.4) and c["fixed_cut"] is None
    text = format_check_split(c)
    assert "66.7%" in text and f"target >= {CHECK_TARGETS['accept_with_check']:.0%}: misses" in text
    assert f"target <= {CHECK_TARGETS['accept_without_check']:.0%}: misses" in text
    with pytest.raises(ValueError, match="with_check"):
        summarise_check_split(recs, with_check[:2])
