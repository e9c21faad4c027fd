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


# ---- bad arguments and strict JSON (issue 22)

@pytest.mark.parametrize("flags, message", [
    (["--k", "1"], "--k must be >= 2"),
    (["--min-gain", "nan"], "--min-gain must be a number"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["--min-segments", "0"], "--min-segments must be >= 1"),
    (["--json", "no/such/folder/ex.json"], "the folder 'no/such/folder' does not exist"),
])
def test_example_bad_arguments_are_one_line_through_the_cli(flags, message, capsys, monkeypatch, tmp_path):
    from fastopd import cli

    monkeypatch.chdir(tmp_path)
    # no model is loaded before the check: loading is made to fail loudly
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("a model was loaded before the arguments were checked"))
    assert cli.main(["example", "--completion", COMPLETION, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastopd example: error: ") and message in err, err


def test_example_json_is_strict_json_when_the_gain_is_minus_infinity(tmp_path, capsys):
    out = tmp_path / "ex.json"
    # one sentence: no split with two segments on each side, so the gain is -inf
    assert example.main(["--completion", "The answer is \\boxed{30}.", "--json", str(out)]) == 0
    text = out.read_text()
    assert "Infinity" not in text and "NaN" not in text
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert res["gain"] is None and res["accepted"] is False
    assert "-inf (no downward split)" in capsys.readouterr().out  # the table still says what it is
