"""`fastopd example`: the release rule end to end on the shipped demo models."""

import json
import math

import pytest

import fastopd
from fastopd import example
from fastopd.train.task import demo_asset_paths

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


def test_example_release_point_matches_weights(tmp_path):
    # accept any downward split, so the release point and the kept tokens are exercised
    res = _run(tmp_path, "--min-gain=-inf", "--min-segments", "1")
    r = res["release_segment"]
    kept = [s["kept"] for s in res["segments"]]
    if res["accepted"]:
        assert kept == [j < r for j in range(len(kept))] and 0 < r < len(kept)
        assert res["tokens_kept"] == sum(s["tokens"] for s in res["segments"][:r])
    else:
        assert all(kept) and res["tokens_kept"] == res["tokens"] and math.isinf(res["gain"])
