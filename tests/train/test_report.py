"""Tests of the plots of runs (fastopd/train/report.py): the margin profile, release positions, the figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastopd.train.report import load_run, make_report, margin_profile, release_fraction
from fastopd.train.runlog import RunLog


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


def _image_has_content(path) -> bool:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img.ndim == 3 and min(img.shape[:2]) > 200 and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20


def test_report_reads_null_gains_as_rollouts_without_a_candidate(tmp_path):
    """A rollout too short for a split has gain -inf, logged as null (strict JSON): the figures still draw, and
    the null reads back as 'no candidate' (not finite), like the -inf it stands for."""
    run = tmp_path / "run"
    run.mkdir()
    log = RunLog(run)
    for step in (1, 2):
        log.write("metrics.jsonl", {"step": step, "loss": 1.0, "kept_fraction": 1.0, "adv_mean": -0.1,
                                    "sample_accuracy": float("nan")})
        log.write("rollouts.jsonl", _rollout([1.0, 0.5], [0, 0], 1, -math.inf, False, step))
        log.write("rollouts.jsonl", _rollout([3.0] * 6 + [1.0] * 6, [i // 3 for i in range(12)], 2, 30.0, True, step))
    loaded = load_run(run)
    assert [r["gain"] for r in loaded["rollouts"]] == [None, 30.0, None, 30.0]
    assert loaded["metrics"][0]["sample_accuracy"] is None
    paths = make_report({"run": run}, tmp_path / "report")
    assert all(_image_has_content(p) for p in paths)
