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


# the long task's first held-out problem (example.DEFAULT_PROBLEMS["long"]) and its reference solution
LONG_COMPLETION = (
    "We add the numbers from left to right. 2 plus 9 is 11. 11 plus 6 is 17. 17 plus 9 is 26. 26 plus 2 is 28. "
    "28 plus 8 is 36. 36 plus 6 is 42. 42 plus 9 is 51. The sum is \\boxed{51}. Now we check every step. "
    "Step 5 is fine. Line 1 is good. Step 2 looks good. Step 6 is correct. Line 3 is correct. Step 7 looks correct. "
    "Line 4 is fine. Thus the sum looks good."
)


def _run(tmp_path, *extra, completion=COMPLETION, task="arithmetic"):
    out = tmp_path / "ex.json"
    argv = ["--task", task, "--json", str(out), *extra]
    assert example.main(argv + (["--completion", completion] if completion is not None else [])) == 0
    return json.loads(out.read_text())


def _check_against_oracle(res, min_gain):
    """The verdict, release point and kept tokens equal the pure-Python scan's on the printed per-segment means."""
    means = np.array([s["mean_margin"] for s in res["segments"]])
    want = reference.bic_release(means, np.array([0, len(means)]), min_segments=2, min_gain=min_gain)
    r = int(want.release_index[0]) if bool(want.accepted[0]) else len(means)
    assert res["accepted"] == bool(want.accepted[0])
    assert [s["kept"] for s in res["segments"]] == [True] * r + [False] * (len(means) - r)
    assert res["tokens_kept"] == sum(s["tokens"] for s in res["segments"][:r])
    assert res["kept_fraction"] == pytest.approx(res["tokens_kept"] / res["tokens"])
    return r


def test_example_default_is_the_long_task_where_the_rule_releases_the_check(tmp_path, capsys):
    # the default run (no --task, no --completion): the student samples a solution to the long task's built-in
    # problem; the rule must accept at the default threshold and release the check, not the derivation
    out = tmp_path / "ex.json"
    assert example.main(["--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["problem"] == example.DEFAULT_PROBLEMS["long"]
    assert res["accepted"] and res["gain"] > 10.0
    r = _check_against_oracle(res, 10.0)
    assert 0 < res["tokens_kept"] < res["tokens"]
    assert "boxed" in " ".join(s["text"] for s in res["segments"][:r])  # the derivation (with the sum) is kept
    released = res["segments"][r]["text"]
    printed = capsys.readouterr().out
    assert f"from \"{released}\" on" in printed and f"kept fraction {res['kept_fraction']:.2f}" in printed


def test_example_long_reference_solution_is_released_at_the_check(tmp_path):
    # the reference solution: the rule releases exactly at the check's opening sentence
    res = _run(tmp_path, task="long", completion=LONG_COMPLETION)
    r = _check_against_oracle(res, 10.0)
    assert res["accepted"] and res["segments"][r]["text"] == "Now we check every step."


def test_example_segments_are_the_sentences(tmp_path, capsys):
    res = _run(tmp_path)
    sentences = [COMPLETION[a:b] for a, b in fastopd.sentence_spans(COMPLETION)]
    assert [s["text"] for s in res["segments"]] == sentences
    assert sum(s["tokens"] for s in res["segments"]) == res["tokens"]
    assert all(math.isfinite(s["mean_margin"]) and s["mean_margin"] >= 0 for s in res["segments"])
    assert res["accepted"] == (res["gain"] > 10.0)
    _check_against_oracle(res, 10.0)
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
