"""`fastopd example`: the release rule end to end on the shipped demo models."""

import json
import math

import numpy as np
import pytest

import fastopd
from fastopd import reference
from fastopd import example
from fastopd.demo.task import demo_asset_paths

pytestmark = pytest.mark.skipif(not demo_asset_paths()["teacher"].exists(), reason="demo assets not built")

COMPLETION = (
    "We start with 7. Adding 5 gives 12. Multiplying by 2 gives 24. Subtracting 3 gives 21. "
    "Adding 9 gives 30. The answer is \\boxed{30}."
)


def _run(tmp_path, *extra):
    out = tmp_path / "ex.json"
    assert example.main(["--completion", COMPLETION, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_example_segments_are_the_sentences(tmp_path, capsys):
    res = _run(tmp_path)
    sentences = [COMPLETION[a:b] for a, b in fastopd.sentence_spans(COMPLETION)]
    assert [s["text"] for s in res["segments"]] == sentences
    assert sum(s["tokens"] for s in res["segments"]) == res["tokens"]
    assert all(math.isfinite(s["mean_margin"]) and s["mean_margin"] >= 0 for s in res["segments"])
    assert res["accepted"] == (res["gain"] > 10.0)
    printed = capsys.readouterr().out
    assert "BIC gain" in printed and "release point" in printed


def test_example_release_point_matches_the_reference_scan(tmp_path):
    # accept any downward split, so the release point and the kept tokens are exercised; the oracle is the
    # pure-Python scan on the printed per-segment means (the example runs ReleaseRule and the C++ scan)
    res = _run(tmp_path, "--min-gain=-inf", "--min-segments", "1")
    means = np.array([s["mean_margin"] for s in res["segments"]])
    want = reference.bic_release(means, np.array([0, len(means)]), min_segments=1, min_gain=-math.inf)
    r = int(want.release_index[0])
    assert bool(want.accepted[0]) and 0 < r < len(means)  # this completion has a downward split
    assert res["accepted"] and res["release_index"] == r and res["gain"] == float(want.gain[0])
    assert [s["kept"] for s in res["segments"]] == [True] * r + [False] * (len(means) - r)
    assert res["release_segment"] == res["segments"][r]["segment"]
    assert res["tokens_kept"] == sum(s["tokens"] for s in res["segments"][:r])


def test_example_default_threshold_keeps_everything_when_not_accepted(tmp_path):
    res = _run(tmp_path)
    if res["accepted"]:  # the verdict itself is checked against the oracle above; here the other branch
        pytest.skip("this completion is accepted at the default threshold")
    assert all(s["kept"] for s in res["segments"]) and res["tokens_kept"] == res["tokens"]
