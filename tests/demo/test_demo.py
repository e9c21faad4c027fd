"""Tests of the embedded demo (fastopd/demo/demo.py) and its report (fastopd/train/report.py).

The end-to-end test (marked slow) runs ``fastopd demo --quick`` on the long task in a subprocess on the shipped
models (about 90 s on an idle 2-core CPU); it is skipped when the demo assets have not been built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT

from fastopd.train.runlog import RunLog
from fastopd.train.report import make_report, margin_profile, release_fraction



def _rollout(margins, segments, release_segment, gain, accepted, step=1):
    return {"step": step, "length": len(margins), "margins": list(map(float, margins)), "segments": list(segments),
            "series": [], "gain": gain, "accepted": accepted, "release_segment": release_segment,
            "kept_fraction": 1.0, "correct": None, "text": ""}


def test_margin_profile_normalises_per_rollout_and_bins_by_relative_position():
    # two rollouts of different lengths and scales, each "high then low" (2:1): normalised by its own mean,
    # the first half is 4/3 and the second half 2/3 whatever the scale or the length
    a = _rollout([2.0] * 10 + [1.0] * 10, [0] * 20, 1, -np.inf, False)
    b = _rollout([20.0] * 40 + [10.0] * 40, [0] * 80, 1, -np.inf, False)
    x, mean, half = margin_profile([a, b], bins=4)
    np.testing.assert_allclose(x, [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(mean, [4 / 3, 4 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(half, 0.0, atol=1e-12)  # identical per-rollout profiles: no spread


def test_release_fraction_counts_tokens_before_the_release_segment():
    rec = _rollout([1.0] * 6, [0, 0, 1, 1, 2, 3], 2, 12.0, True)
    assert release_fraction(rec) == pytest.approx(4 / 6)
    rec = _rollout([1.0] * 3, [0, 1, 2], 3, 1.0, False)
    assert release_fraction(rec) == 1.0


def test_make_report_writes_the_four_figures(tmp_path):
    rng = np.random.default_rng(0)
    for name, accept in (("full", False), ("release", True)):
        log = RunLog(tmp_path / name)
        (tmp_path / name).mkdir()
        for step in (1, 2, 3):
            log.write("metrics.jsonl", {"step": step, "loss": 1.0 / step, "kept_fraction": 0.7, "adv_mean": -0.1,
                                        "sample_accuracy": 0.1 * step})
            for _ in range(5):
                m = np.concatenate([rng.uniform(2, 3, 12), rng.uniform(0, 1, 8)])
                log.write("rollouts.jsonl", _rollout(m, [i // 4 for i in range(20)], 3, 25.0, accept, step))
        log.write("eval.jsonl", {"step": 3, "accuracy": 0.5})
    paths = make_report({"full": tmp_path / "full", "release": tmp_path / "release"}, tmp_path / "report")
    assert [p.name for p in paths] == ["margin_profile.png", "bic_gains.png", "release_positions.png",
                                       "training_curves.png"]
    import matplotlib.image

    for p in paths:  # each file decodes as an image with drawn content (not a blank canvas)
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and min(img.shape[:2]) > 200
        assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20


def test_format_table_prints_every_row():
    from fastopd.demo.demo import format_table

    arm = {"accuracy_after": 0.5, "tokens": 1000, "tokens_supervised": 600, "supervised_fraction": 0.6,
           "time_per_step": 1.25, "accept_rate": 0.4, "release_position": 0.55, "kl_first": 1.5, "kl_last": 0.75,
           "kl_window": 10}
    md = format_table({"eval_problems": 200, "teacher_accuracy": 0.9, "student_accuracy_before": 0.2,
                       "arms": {"full": {**arm, "tokens_supervised": 1000, "supervised_fraction": 1.0},
                                "release": arm},
                       "steps": 10, "rollouts_per_step": 32, "seed": 0, "total_time_s": 100.0})
    assert "| teacher | 90.0% |" in md and "| student before OPD | 20.0% |" in md
    assert "600 of 1,000 (60%)" in md and "1.25 s" in md and "accept rate 40.0%" in md
    assert "1.500 -> 0.750" in md


def _assets_built() -> bool:
    from fastopd.demo.task import demo_asset_paths

    paths = demo_asset_paths()
    return all(Path(paths[k]).exists() for k in ("teacher", "student", "tokenizer"))


@pytest.mark.slow
@pytest.mark.skipif(not _assets_built(), reason="demo assets not built (scripts/build_demo_assets.py)")
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "fastopd", "demo", "--quick", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    assert "| teacher |" in res.stdout and "| student after release-rule OPD" in res.stdout
    assert (out / "table.md").read_text().strip() in res.stdout
    for key in ("teacher_accuracy", "student_accuracy_before"):
        assert 0.0 <= table[key] <= 1.0
    full, rel = table["arms"]["full"], table["arms"]["release"]
    assert full["tokens_supervised"] == full["tokens"]  # the control supervises every valid token
    assert rel["tokens_supervised"] <= rel["tokens"]
    # same start and seed: the first step's prompts and rollouts are identical in both arms
    first = [json.loads((out / arm / "metrics.jsonl").read_text().splitlines()[0]) for arm in ("full", "release")]
    assert first[0]["tokens"] == first[1]["tokens"] and first[0]["margin_mean"] == first[1]["margin_mean"]
    for name in ("margin_profile", "bic_gains", "release_positions", "training_curves"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    assert table["total_time_s"] < 300  # the budget is 90 s on 2 cores; leave room for a busy machine
    # the long task by default: precondition on >= 256 of the student's rollouts, OOD accuracy, phase timings
    assert table["task"] == "long" and table["ood_task"] == "arithmetic"
    pre = table["precondition"]
    assert pre["rollouts"] >= 256 and len((out / "precondition" / "rollouts.jsonl").read_text().splitlines()) == 256
    assert 0.0 <= pre["accept_rate"] <= 1.0 and pre["margin_ratio"] > 0
    assert "Precondition on 256 student rollouts" in res.stdout and "of a step (goal <= 3%)" in res.stdout
    for arm in (full, rel):
        assert 0.0 <= arm["ood_accuracy_after"] <= 1.0
        assert 0.0 < arm["share_rule"] < 1.0 and arm["time_rule"] > 0
    for arm in ("full", "release"):
        assert (out / arm / "rollouts.jsonl").stat().st_size > 0
    assert rel["accept_rate"] > 0.0 and rel["tokens_supervised"] < rel["tokens"]  # the rule acts on this task
