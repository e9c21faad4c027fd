"""Plots of OPD runs, like the paper's figures (matplotlib, Agg backend), from the runs' JSONL logs.

Each run folder (a trainer ``output_dir``) holds ``metrics.jsonl``, ``eval.jsonl`` and, with
``log_rollouts=True``, ``rollouts.jsonl`` (per rollout: valid-token margins m_t, segment ids, the scan's
gain, whether it was accepted, its release segment). :func:`make_report` draws, for one or more runs:

- ``margin_profile.png``: the teacher margin m_t (over the student's top-K, K named in the title) against the
  relative position in the response, each rollout's margins divided by their mean, averaged per position
  bin over rollouts (with a 95% band);
- ``bic_gains.png``: histogram of the BIC gains of the rollouts that have a downward split (those without
  one are counted in the legend), the acceptance threshold, each run's accept rate in its legend entry;
- ``release_positions.png``: side-by-side histogram bars (one per run) of the release position (fraction of
  the response before the release point) of the accepted rollouts, each run's mean dashed;
- ``training_curves.png``: loss, kept fraction, accuracy (the step's sampled rollouts as lines, the greedy
  evaluations on held-out problems as markers) and mean advantage per step, one colour per run.

Every figure has a title, labelled axes, and its legend outside the data.
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
    """``{"metrics": [...], "eval": [...], "rollouts": [...], "config": {...}}`` of a run folder (``config``: its
    ``config.yaml``, empty when there is none, as in a precondition folder)."""
    import yaml

    run_dir = Path(run_dir)
    run = {name: read_log(run_dir / f"{name}.jsonl") for name in ("metrics", "eval", "rollouts")}
    cfg = run_dir / "config.yaml"
    run["config"] = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}) if cfg.is_file() else {}
    return run


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


def _run_k(runs: dict[str, dict]):
    """The student candidates K of the runs' margins, from their ``config.yaml`` (None if no run has one; a
    ValueError if the runs disagree, since their margins would not be comparable)."""
    ks = {run["config"]["k"] for run in runs.values() if run.get("config") and "k" in run["config"]}
    if len(ks) > 1:
        raise ValueError(f"the runs' margins use different K (config k): {sorted(ks)}")
    return ks.pop() if ks else None


def _legend_below(ax, ncol: int = 1) -> None:
    """The axes' legend under the plot, outside the data (nothing drawn is hidden by it)."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False)


def plot_margin_profile(runs: dict[str, dict], path: Path, bins: int = 20, k: int | None = None) -> Path:
    """Margin profile of each run's rollouts; ``k`` (None: the runs' ``config.yaml``) is named in the title."""
    plt = _pyplot()
    k = _run_k(runs) if k is None else k
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for (name, run), color in zip(runs.items(), COLORS):
        if not run["rollouts"]:
            continue
        x, y, h = margin_profile(run["rollouts"], bins)
        ax.plot(x, y, marker="o", ms=3, color=color, label=f"{name} ({len(run['rollouts'])} rollouts; band: 95% CI)")
        ax.fill_between(x, y - h, y + h, color=color, alpha=0.2)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="the rollout's mean margin")
    ax.set_xlabel(f"relative position in the response (token / length, {bins} bins)")
    ax.set_ylabel("teacher margin m_t / the rollout's mean margin")
    among = f"top-K (K = {k})" if k is not None else "top-K"
    ax.set_title(f"Teacher margin m_t over the response: top-1 minus top-2 teacher logit\n"
                 f"among the student's {among} candidates, mean over rollouts per bin", fontsize=10)
    _legend_below(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gain_histogram(runs: dict[str, dict], path: Path, min_gain: float = 10.0) -> Path:
    """Histogram of the BIC gains of the rollouts that have a downward split (a rollout without one has gain
    -inf and is counted in the legend, not drawn); the accept rate of each run in its legend entry."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    all_gains = [g for run in runs.values() for g in (as_float(r["gain"]) for r in run["rollouts"]) if np.isfinite(g)]
    edges = np.histogram_bin_edges(all_gains or [0.0, 1.0], bins=40)
    for (name, run), color in zip(runs.items(), COLORS):
        recs = run["rollouts"]
        if not recs:
            continue
        gains = np.array([as_float(r["gain"]) for r in recs], dtype=np.float64)
        finite = np.isfinite(gains)
        rate = float(np.mean([r["accepted"] for r in recs]))
        none = f", {(~finite).sum()} with no downward split (not drawn)" if (~finite).any() else ""
        ax.hist(gains[finite], bins=edges, histtype="step", lw=1.5, color=color,
                label=f"{name}: {len(recs)} rollouts, {rate:.1%} accepted (gain > {min_gain:g}){none}")
    ax.axvline(min_gain, color="black", ls="--", lw=1, label=f"accept threshold min_gain = {min_gain:g}")
    ax.set_xlabel("BIC gain of the best release split, BIC0 - BIC1")
    ax.set_ylabel("rollouts per bin (log scale)")
    ax.set_yscale("log")
    ax.set_title("BIC gain per rollout: how much better a prefix/suffix split\nexplains its segment margins than "
                 "one level", fontsize=10)
    _legend_below(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_release_positions(runs: dict[str, dict], path: Path) -> Path:
    """Side-by-side bars per bin (one bar per run, so no run hides another) of the release position of the
    accepted rollouts; each run's mean as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    drawn = [(name, color, [release_fraction(r) for r in run["rollouts"] if r["accepted"]])
             for (name, run), color in zip(runs.items(), COLORS)]
    drawn = [d for d in drawn if d[2]]
    # bins of 0.025 over the range the positions take (with one empty bin either side), inside [0, 1]
    every = np.concatenate([d[2] for d in drawn]) if drawn else np.array([0.0, 1.0])
    lo, hi = max(0.0, np.floor(every.min() * 40) / 40 - 0.025), min(1.0, np.ceil(every.max() * 40) / 40 + 0.025)
    edges = np.linspace(lo, hi, max(2, int(round((hi - lo) * 40))) + 1)
    width = (edges[1] - edges[0]) / max(1, len(drawn))
    for i, (name, color, pos) in enumerate(drawn):
        counts, _ = np.histogram(pos, bins=edges)
        ax.bar(edges[:-1] + (i + 0.5) * width, counts, width=width, color=color, alpha=0.85,
               label=f"{name}: {len(pos)} accepted rollouts, mean {np.mean(pos):.2f}")
        ax.axvline(np.mean(pos), color=color, ls="--", lw=1)
    ax.set_xlabel("release position: fraction of the response's tokens before the release point (kept)")
    ax.set_ylabel("accepted rollouts per bin")
    ax.set_title("Where the rule releases, per accepted rollout (in a control run such as full:\nwhere it would "
                 "release); dashed: each run's mean", fontsize=10)
    ax.set_xlim(edges[0], edges[-1])
    if drawn:
        _legend_below(ax)
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


EVAL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
"""Greedy-eval markers, one per run, drawn largest first so that equal points stay visible."""
LINE_STYLES = (("-", 2.4), ("--", 2.0), ("-.", 1.6), (":", 1.6), ("-", 1.2), ("--", 1.0), ("-.", 0.9), (":", 0.9))
"""Line style and width per run, widest first, so that a run whose curve equals another's stays visible."""


def plot_training_curves(runs: dict[str, dict], path: Path) -> Path:
    """Per step: loss, kept fraction, accuracy (the step's sampled rollouts, and the greedy evaluations on
    held-out problems) and mean advantage, one colour per run; thin lines raw, thick a moving mean."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    panels = (("loss", "loss", "loss of the step"),
              ("kept_fraction", "kept fraction", "kept fraction: supervised / valid tokens"),
              ("sample_accuracy", "accuracy", "accuracy: sampled rollouts (lines) vs greedy eval (markers)"),
              ("adv_mean", "mean advantage A_t", "mean advantage A_t = log p_T(y_t) - log p_S(y_t)"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    shown = [(name, run, color, marker) for (name, run), color, marker in zip(runs.items(), COLORS, EVAL_MARKERS)
             if run["metrics"] or run["eval"]]
    for ax, (key, ylabel, title) in zip(axes.flat, panels):
        for i, (name, run, color, marker) in enumerate(shown):
            rows = run["metrics"]
            if rows:
                x = np.array([r["step"] for r in rows])
                y = np.array([as_float(r.get(key)) for r in rows], dtype=np.float64)
                ls, lw = LINE_STYLES[i % len(LINE_STYLES)]
                ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
                ax.plot(x, _smooth(y, max(1, len(rows) // 15)), color=color, ls=ls, lw=lw)
            if key == "sample_accuracy" and run["eval"]:
                ax.plot([e["step"] for e in run["eval"]], [e["accuracy"] for e in run["eval"]], ls=":", lw=1,
                        marker=marker, color=color, ms=9 - 1.5 * i, mec="black", mew=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, ls=LINE_STYLES[i % len(LINE_STYLES)][0], lw=LINE_STYLES[i % len(LINE_STYLES)][1],
                      marker=m, mec="black", mew=0.5, label=n) for i, (n, _, c, m) in enumerate(shown)]
    handles += [Line2D([], [], color="gray", lw=1.5, label="lines: per step (moving mean; thin: raw); accuracy of "
                       "the step's sampled rollouts\n(temperature 1; for an sft baseline the teacher's samples)"),
                Line2D([], [], color="gray", ls="", marker="o", mec="black", mew=0.5,
                       label="markers: greedy eval accuracy on the held-out problems")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Training curves per optimizer step, {len(shown)} run(s) (legend below)", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(runs: dict[str, str | Path | dict], out_dir: str | Path, *, min_gain: float = 10.0,
                k: int | None = None) -> list[Path]:
    """Draw the four figures for ``runs`` (name -> run folder or :func:`load_run` dict) into ``out_dir``;
    ``k``: the margins' K named in the margin profile (None: from the runs' ``config.yaml``).

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
        plot_margin_profile(loaded, out_dir / "margin_profile.png", k=k),
        plot_gain_histogram(loaded, out_dir / "bic_gains.png", min_gain=min_gain),
        plot_release_positions(loaded, out_dir / "release_positions.png"),
        plot_training_curves(loaded, out_dir / "training_curves.png"),
    ]
