"""Tests of the plots of runs (fastopd/train/report.py): the margin profile, release positions, the figures."""

from __future__ import annotations

import math
from pathlib import Path

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


# ------------------------------------------------------------------------------------------ what the figures show
def _runs(tmp_path, names=("full", "release", "online", "sft"), k=16):
    """Run folders with metrics, eval points, rollouts (accepted at about 60 %) and a config.yaml with ``k``."""
    rng = np.random.default_rng(1)
    for name in names:
        log = RunLog(tmp_path / name)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"k: {k}\nmode: {name}\n")
        for step in range(1, 7):
            log.write("metrics.jsonl", {"step": step, "loss": 1.0 / step, "kept_fraction": 0.6, "adv_mean": -0.1,
                                        "sample_accuracy": 0.1})
            for _ in range(6):
                m = np.concatenate([rng.uniform(2, 3, 12), rng.uniform(0, 1, 8)])
                log.write("rollouts.jsonl", _rollout(m, [i // 4 for i in range(20)], 3, float(rng.uniform(15, 40)),
                                                     True, step))
        log.write("eval.jsonl", {"step": 3, "accuracy": 0.5})
        log.write("eval.jsonl", {"step": 6, "accuracy": 0.5})  # every run equal: the markers must still all show
    return {name: tmp_path / name for name in names}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """make_report's figures as matplotlib objects (name -> (Figure, its Agg renderer)), as they were saved."""
    from matplotlib.figure import Figure

    figures = {}
    save = Figure.savefig

    def keep(self, path, *a, **kw):
        save(self, path, *a, **kw)
        figures[Path(path).name] = (self, self.canvas.get_renderer())  # before plt.close detaches the canvas

    tmp_path = tmp_path_factory.mktemp("report")
    runs = _runs(tmp_path)
    Figure.savefig = keep
    try:
        make_report(runs, tmp_path / "report")
    finally:
        Figure.savefig = save
    return figures, list(runs)


def _inside(inner, outer, tol=1.0) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol and inner.x1 <= outer.x1 + tol
            and inner.y1 <= outer.y1 + tol)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_every_figure_has_a_title_labelled_axes_and_a_legend_outside_the_data(drawn):
    figures, names = drawn
    assert set(figures) == {"margin_profile.png", "bic_gains.png", "release_positions.png", "training_curves.png"}
    for fname, (fig, renderer) in figures.items():
        page = fig.bbox
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends, f"{fname}: no legend"
        labels = [t.get_text() for leg in legends for t in leg.get_texts()]
        for name in names:  # every run is named in the legend
            assert any(label.startswith(name) for label in labels), (fname, name, labels)
        for ax in fig.axes:
            title = ax.get_title() or (fig._suptitle.get_text() if fig._suptitle else "")
            assert title.strip() and ax.get_xlabel().strip() and ax.get_ylabel().strip(), fname
            if ax.get_title():  # the title is not cut at the figure's edge
                assert _inside(ax.title.get_window_extent(renderer), page), (fname, ax.get_title())
            for leg in legends:  # no legend over any axes' data area
                assert not _overlaps(leg.get_window_extent(renderer), ax.get_window_extent(renderer)), fname
        for leg in legends:
            assert _inside(leg.get_window_extent(renderer), page), f"{fname}: legend cut"


def test_margin_profile_gives_k(drawn):
    figures, _ = drawn
    assert "K = 16" in figures["margin_profile.png"][0].axes[0].get_title()


def test_bic_gains_says_what_each_count_is_without_the_old_phrase(drawn):
    figures, names = drawn
    ax = figures["bic_gains.png"][0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any("with a candidate" in label for label in labels)
    for name in names:
        assert any(label.startswith(f"{name}: 36 rollouts, 100.0% accepted (gain > 10)") for label in labels), labels


def test_release_positions_bars_sit_side_by_side(drawn):
    # one bar container per run, and no bar of one run covers any bar of another (disjoint x ranges)
    figures, names = drawn
    ax = figures["release_positions.png"][0].axes[0]
    assert len(ax.containers) == len(names)
    spans = [[(b.get_x(), b.get_x() + b.get_width()) for b in c] for c in ax.containers]
    for i in range(len(spans)):
        for j in range(i + 1, len(spans)):
            for a0, a1 in spans[i]:
                assert all(a1 <= b0 + 1e-12 or b1 <= a0 + 1e-12 for b0, b1 in spans[j])


def test_training_curves_tell_sampled_from_greedy_accuracy_and_show_every_run(drawn):
    figures, names = drawn
    fig = figures["training_curves.png"][0]
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("sampled rollouts" in label for label in labels) and any("greedy eval" in label for label in labels)
    acc = next(ax for ax in fig.axes if ax.get_ylabel() == "accuracy")
    assert "sampled" in acc.get_title() and "greedy" in acc.get_title()
    # every run's greedy-eval points are drawn, each with its own marker (equal values stay visible)
    evals = [line for line in acc.get_lines() if line.get_marker() not in ("None", None, "")]
    assert len(evals) == len(names) and len({line.get_marker() for line in evals}) == len(names)
    sizes = [line.get_markersize() for line in evals]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(names)
