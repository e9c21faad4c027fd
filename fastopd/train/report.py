"""Plots of OPD runs, like the paper's figures (matplotlib, Agg backend), from the runs' JSONL logs.

Each run folder (a trainer ``output_dir``) holds ``metrics.jsonl``, ``eval.jsonl`` and, with
``log_rollouts=True``, ``rollouts.jsonl`` (per rollout: valid-token margins m_t, segment ids, the scan's
gain, whether it was accepted, its release segment). :func:`make_report` draws, for one or more runs:

- ``margin_profile.png``: the teacher margin m_t against the relative position in the response, each
  rollout's margins divided by their mean, averaged per position bin over rollouts (with a 95% band);
- ``bic_gains.png``: histogram of the BIC gains (rollouts that have a candidate split), the acceptance
  threshold, and the accept rate in the title;
- ``release_positions.png``: histogram of the release position (fraction of the response before the
  release point) of the accepted rollouts;
- ``training_curves.png``: loss, kept fraction, sampled-rollout accuracy (+ greedy eval accuracy) and mean
  advantage per step, one line per run.

The release decision is computed in every mode (the ``full`` control too), so the diagnostics of a control
run show where the rule *would* have released.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fastopd.common import release_fractions
from fastopd.train.runlog import as_float, read_log

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def load_run(run_dir: str | Path) -> dict:
    """``{"metrics": [...], "eval": [...], "rollouts": [...]}`` of a run folder."""
    run_dir = Path(run_dir)
    return {name: read_log(run_dir / f"{name}.jsonl") for name in ("metrics", "eval", "rollouts")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def release_fraction(rec: dict) -> float:
    """A ``rollouts.jsonl`` record's release position: :func:`fastopd.common.release_fractions` of its valid
    tokens (``rec["segments"]``) and ``rec["release_segment"]`` (1.0 when not accepted, NaN when empty)."""
    seg = np.asarray(rec["segments"], dtype=np.int64)[None]
    return float(release_fractions(seg, np.ones(seg.shape, dtype=bool), [rec["release_segment"]])[0])


def margin_profile(rollouts: list[dict], bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres, mean, 95% half-width) of the per-rollout normalised margin over relative position.

    Rollout r's margins m_t (t = 0..L-1) are divided by their mean; token t sits at (t + 0.5) / L; each
    rollout contributes the mean of its tokens in each bin, and the bins are averaged over rollouts.
    Rollouts with a non-positive mean margin or fewer than ``bins // 4`` tokens are skipped.
    """
    per_bin = [[] for _ in range(bins)]
    for rec in rollouts:
        m = np.asarray(rec["margins"], dtype=np.float64)
        if m.size < max(2, bins // 4) or not np.mean(m) > 0:
            continue
        m = m / m.mean()
        idx = np.minimum(((np.arange(m.size) + 0.5) / m.size * bins).astype(int), bins - 1)
        sums = np.bincount(idx, weights=m, minlength=bins)
        counts = np.bincount(idx, minlength=bins)
        for b in np.nonzero(counts)[0]:
            per_bin[b].append(sums[b] / counts[b])
    centres = (np.arange(bins) + 0.5) / bins
    mean = np.array([np.mean(v) if v else np.nan for v in per_bin])
    half = np.array([1.96 * np.std(v) / math.sqrt(len(v)) if len(v) > 1 else np.nan for v in per_bin])
    return centres, mean, half


def plot_margin_profile(runs: dict[str, dict], path: Path, bins: int = 20) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, run), color in zip(runs.items(), COLORS):
        if not run["rollouts"]:
            continue
        x, y, h = margin_profile(run["rollouts"], bins)
        ax.plot(x, y, marker="o", ms=3, color=color, label=f"{name} ({len(run['rollouts'])} rollouts)")
        ax.fill_between(x, y - h, y + h, color=color, alpha=0.2)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("relative position in the response")
    ax.set_ylabel("teacher margin / rollout mean")
    ax.set_title("Teacher top-1 vs top-2 margin over the student's top-K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gain_histogram(runs: dict[str, dict], path: Path, min_gain: float = 10.0) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    titles = []
    all_gains = [g for run in runs.values() for g in (as_float(r["gain"]) for r in run["rollouts"]) if np.isfinite(g)]
    edges = np.histogram_bin_edges(all_gains or [0.0, 1.0], bins=40)
    for (name, run), color in zip(runs.items(), COLORS):
        recs = run["rollouts"]
        if not recs:
            continue
        gains = np.array([as_float(r["gain"]) for r in recs], dtype=np.float64)
        finite = np.isfinite(gains)
        rate = float(np.mean([r["accepted"] for r in recs]))
        ax.hist(gains[finite], bins=edges, histtype="step", lw=1.5, color=color,
                label=f"{name}: {finite.sum()} with a candidate, {(~finite).sum()} without")
        titles.append(f"{name} {rate:.1%}")
    ax.axvline(min_gain, color="black", ls="--", lw=1, label=f"threshold {min_gain:g}")
    ax.set_xlabel("BIC gain (BIC0 - BIC1)")
    ax.set_ylabel("rollouts (log scale)")
    ax.set_yscale("log")
    ax.set_title("BIC gains; accept rate: " + ", ".join(titles), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_release_positions(runs: dict[str, dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.linspace(0, 1, 21)
    for (name, run), color in zip(runs.items(), COLORS):
        pos = [release_fraction(r) for r in run["rollouts"] if r["accepted"]]
        if pos:
            ax.hist(pos, bins=edges, histtype="step", lw=1.5, color=color,
                    label=f"{name}: {len(pos)} accepted, mean {np.mean(pos):.2f}")
    ax.set_xlabel("release position (fraction of the response kept)")
    ax.set_ylabel("accepted rollouts")
    ax.set_title("Where the rule releases")
    ax.set_xlim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no rollout accepted", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or y.size < width:
        return y
    kernel = np.ones(width) / width
    pad = np.concatenate([np.full(width // 2, y[0]), y, np.full(width - 1 - width // 2, y[-1])])
    return np.convolve(pad, kernel, mode="valid")


def plot_training_curves(runs: dict[str, dict], path: Path) -> Path:
    plt = _pyplot()
    panels = (("loss", "loss"), ("kept_fraction", "kept fraction (supervised / valid tokens)"),
              ("sample_accuracy", "accuracy (sampled rollouts; dots: greedy eval)"), ("adv_mean", "mean advantage A_t"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        for (name, run), color in zip(runs.items(), COLORS):
            rows = run["metrics"]
            if not rows:
                continue
            x = np.array([r["step"] for r in rows])
            y = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
            width = max(1, len(rows) // 15)
            ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
            ax.plot(x, _smooth(y, width), color=color, lw=1.5, label=name)
            if key == "sample_accuracy" and run["eval"]:
                ax.plot([e["step"] for e in run["eval"]], [e["accuracy"] for e in run["eval"]], "o", color=color,
                        ms=5, mec="black", mew=0.5)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(runs: dict[str, str | Path | dict], out_dir: str | Path, *, min_gain: float = 10.0) -> list[Path]:
    """Draw the four figures for ``runs`` (name -> run folder or :func:`load_run` dict) into ``out_dir``.

    A folder that does not exist or holds none of a run's logs (``metrics.jsonl``, ``eval.jsonl``,
    ``rollouts.jsonl``) is an error naming it, before anything is drawn or ``out_dir`` is made."""
    if not math.isfinite(min_gain):
        raise ValueError(f"min_gain must be a finite number, got {min_gain!r}")
    for name, run in runs.items():
        if isinstance(run, dict):
            continue
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder not found: {run_dir}")
        if not any((run_dir / f"{log}.jsonl").is_file() for log in ("metrics", "eval", "rollouts")):
            raise ValueError(f"{run_dir} is not a run folder: it holds none of metrics.jsonl, eval.jsonl, "
                             "rollouts.jsonl (a trainer output_dir)")
    loaded = {name: (run if isinstance(run, dict) else load_run(run)) for name, run in runs.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_margin_profile(loaded, out_dir / "margin_profile.png"),
        plot_gain_histogram(loaded, out_dir / "bic_gains.png", min_gain=min_gain),
        plot_release_positions(loaded, out_dir / "release_positions.png"),
        plot_training_curves(loaded, out_dir / "training_curves.png"),
    ]
