"""``fastopd study``: the release rule against every control, over several seeds, as one command.

Arms (``ReleaseRule`` modes): ``release``, ``full``, ``fixed_prefix`` (its fraction set to the release arm's
measured mean kept fraction of the same seed), ``random`` and ``shuffled``; and the trainer's ``sft`` baseline
(the teacher samples as many completions per step, the student learns them by cross-entropy); ``online``
(the rule decided while sampling: each rollout stops where it releases, docs/formulas.md §8) and ``truncate``
(``full`` with every rollout stopped at one fixed length, the online arm's mean generated length of the same
seed: the fixed-budget Prefix-OPD baseline). Every arm of every seed starts from
the same shipped student; the seed changes the rollouts' sampling and the prompt order. Each run is the
demo's configuration (:func:`fastopd.demo.demo.demo_config`) with ``mode`` and ``seed`` set; after it the
final student is graded greedily on held-out problems of the task (in-domain) and of the other task (OOD).

Output folder::

    runs/<mode>-s<seed>/          the trainer's run folder, plus result.json once the run is finished
    precondition/                 the precondition on the initial student (fastopd.demo.precondition)
    study.json                    {"arms": {"<mode>": [{"seed", "accuracy", "ood_accuracy", "tokens",
                                  "tokens_supervised", "accept_rate", "gain_mean", "time_per_step",
                                  "curve": [[step, accuracy], ...]}, ...]}, ...}
    study.md                      mean ± std per arm; paired difference release - control over seeds, 95 %
                                  bootstrap interval
    accuracy.png, margin_profile.png, bic_gains.png

    settings.json                 the settings every run of the folder shares (:data:`STUDY_FIELDS`, the task)

Resumable: a run whose ``result.json`` exists is not rerun (a half-finished run is restarted from scratch), so
running the same command again after an interruption only does what is missing and rewrites the summary. Seeds
and arms may be added. A folder whose ``settings.json`` records other settings (another task, other steps, ...)
is refused in one line naming what differs, before anything is done: its runs, baseline and precondition
belong to those settings. Every JSON file is written atomically (:func:`fastopd.train.checkpoint.atomic_write_text`);
a torn ``result.json``, ``baseline.json`` or ``precondition.json`` (written by an older version, or damaged) is
recomputed, and the study says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

ARMS = ("release", "full", "fixed_prefix", "random", "shuffled", "sft", "online", "truncate")
# Each arm as the trainer's three choices, and the matched controls' settings: fastopd.demo.demo (ARM_FIELDS,
# MATCHED, matched_fields), shared with the demo.
ROW_KEYS = ("seed", "accuracy", "ood_accuracy", "tokens", "tokens_supervised", "accept_rate", "gain_mean",
            "time_per_step", "ood_nll", "curve", "tokens_generated", "teacher_tokens", "generated_per_rollout",
            "max_new_tokens")
METRICS = (("accuracy", "in-domain accuracy"), ("gain_vs_start", "in-domain gain over the start"),
           ("ood_accuracy", "OOD accuracy"),
           ("ood_nll", "OOD reference NLL (nats/token)"),
           ("tokens_supervised", "tokens supervised"), ("accept_rate", "accept rate"),
           ("time_per_step", "time / step (s)"))

CHECK_METRICS = METRICS[:1] + (("accuracy_check", "accuracy, problems with a check"),
                                ("accuracy_nocheck", "accuracy, problems without a check")) + METRICS[1:]
"""On the check task (:mod:`fastopd.demo.check_task`) the accuracy is also split by the problem's prompt."""
PAIRS = (("release", "fixed_prefix"), ("release", "shuffled"), ("release", "full"), ("online", "truncate"))
"""Issue 24's paired comparisons (a - b, same seed) on the check task."""
PAIR_KEYS = (("accuracy", "accuracy"), ("accuracy_check", "accuracy with a check"),
             ("accuracy_nocheck", "accuracy without a check"), ("tokens_supervised", "tokens supervised"),
             ("tokens_generated", "tokens generated"), ("time_per_step", "time / step (s)"))

STUDY_FIELDS = ("steps", "prompts_per_step", "num_samples", "max_new_tokens", "temperature", "top_p", "top_k",
                "loss", "k", "loss_temperature", "min_segments", "min_gain", "confirm_segments", "online_chunk_size",
                "grad_accum_steps", "lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "lr_scheduler",
                "warmup_steps", "max_grad_norm", "max_prompt_tokens", "chat_template", "eval_every", "eval_size",
                "eval_max_new_tokens", "verifier", "student_dtype", "teacher_dtype", "mixed_precision")
"""The settings of a study that its runs, baseline and precondition depend on, besides the task (recorded in
settings.json): the demo schedule's training and evaluation fields. Not here: what a study varies (``seed``,
``mode``, the fixed_prefix ``fraction``, the truncate arm's ``max_new_tokens`` derive from it), and paths."""

__all__ = ["ARMS", "run_study", "aggregate", "paired_bootstrap", "problem_bootstrap", "paired_pairs",
           "format_study", "plot_study", "CHECK_METRICS", "PAIRS"]


# ----------------------------------------------------------------------------------------------------------
# Statistics (pure functions: the tests run them on a fake study)
# ----------------------------------------------------------------------------------------------------------


def paired_bootstrap(diffs, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of paired differences and its percentile bootstrap interval (seeds resampled with replacement).

    Returns ``{"mean", "lo", "hi", "n"}``; with a single difference the interval is that value.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"diffs must be a non-empty 1-D sequence, got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not np.isfinite(d).all():
        raise ValueError(f"diffs must be finite, got {d.tolist()}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    a = (1 - level) / 2
    return {"mean": float(d.mean()), "lo": float(np.quantile(means, a)), "hi": float(np.quantile(means, 1 - a)),
            "n": int(d.size)}


def problem_bootstrap(correct_a, correct_b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Paired per-problem interval of accuracy(a) - accuracy(b): ``correct_a``/``correct_b`` are (seeds, problems)
    0/1 arrays of the same held-out problems (row s of both: the same seed); each problem's difference is averaged
    over the seeds and the problems are resampled with replacement. It measures how much the difference depends
    on which problems were held out, not how much it varies between training seeds (:func:`paired_bootstrap`).

    Returns ``{"mean", "lo", "hi", "n"}`` (``n``: problems)."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"correct_a and correct_b must be (seeds, problems) arrays of one non-empty shape, got "
                         f"{a.shape} and {b.shape}")
    d = (a - b).mean(axis=0)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size)}


def paired_pairs(arms: dict[str, list[dict]], pairs=PAIRS, keys=PAIR_KEYS, *, n_boot: int = 10_000,
                 with_check: list[bool] | None = None) -> dict:
    """For each pair ``(a, b)`` present in ``arms`` and each key: the paired difference a - b over the seeds both
    have, with :func:`paired_bootstrap`'s interval (``"seeds"``); for the accuracies, with the rows' per-problem
    ``correct`` lists, also :func:`problem_bootstrap`'s (``"problems"``; ``with_check`` selects the problems of
    ``accuracy_check`` / ``accuracy_nocheck``). Returns ``{"a - b": {key: {"seeds": ..., "problems": ...}}}``."""
    out = {}
    for a, b in pairs:
        if a not in arms or b not in arms:
            continue
        ra = {r["seed"]: r for r in arms[a]}
        rb = {r["seed"]: r for r in arms[b]}
        seeds = sorted(set(ra) & set(rb))
        cell = {}
        for key, _ in keys:
            diffs = [ra[s][key] - rb[s][key] for s in seeds
                     if ra[s].get(key) is not None and rb[s].get(key) is not None
                     and math.isfinite(ra[s][key]) and math.isfinite(rb[s][key])]
            cell[key] = {"seeds": paired_bootstrap(diffs, n_boot=n_boot) if diffs else None, "problems": None}
            if key.startswith("accuracy") and all(ra[s].get("correct") and rb[s].get("correct") for s in seeds) \
                    and seeds:
                ca = np.array([ra[s]["correct"] for s in seeds], dtype=np.float64)
                cb = np.array([rb[s]["correct"] for s in seeds], dtype=np.float64)
                if key != "accuracy":
                    if with_check is None:
                        continue
                    keep = np.asarray(with_check, dtype=bool)
                    keep = keep if key == "accuracy_check" else ~keep
                    ca, cb = ca[:, keep], cb[:, keep]
                if ca.shape[1]:
                    cell[key]["problems"] = problem_bootstrap(ca, cb, n_boot=n_boot)
        out[f"{a} - {b}"] = cell
    return out


def aggregate(arms: dict[str, list[dict]], *, reference: str = "release", n_boot: int = 10_000,
              start: float | None = None, metrics=METRICS) -> dict:
    """Per arm and metric: mean, std (ddof 1; 0 with one seed), n; per control: the paired difference
    ``reference - control`` over the seeds both have, with its bootstrap interval (:func:`paired_bootstrap`).

    ``start``: the starting student's in-domain accuracy; ``gain_vs_start`` is each run's accuracy minus it, and
    ``summary["above_start"][mode]`` counts the seeds that ended above it."""
    if reference not in arms:
        raise ValueError(f"arms must include the reference arm {reference!r}, got {sorted(arms)}")
    summary: dict = {"arms": {}, "paired": {}, "above_start": {}}
    for mode, rows in arms.items():
        s = {}
        if start is not None:
            rows = [dict(r, gain_vs_start=r["accuracy"] - start) if r.get("accuracy") is not None else r for r in rows]
            summary["above_start"][mode] = {"seeds": sum(r.get("gain_vs_start", 0) > 0 for r in rows), "of": len(rows)}
        for key, _ in metrics:
            v = np.array([r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])], dtype=np.float64)
            s[key] = {"mean": float(v.mean()) if v.size else float("nan"),
                      "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
        summary["arms"][mode] = s
    ref = {r["seed"]: r for r in arms[reference]}
    for mode, rows in arms.items():
        if mode == reference:
            continue
        summary["paired"][mode] = {}
        for key in ("accuracy", "ood_accuracy", "ood_nll"):
            diffs = [ref[r["seed"]][key] - r[key] for r in rows
                     if r["seed"] in ref and r.get(key) is not None and ref[r["seed"]].get(key) is not None]
            summary["paired"][mode][key] = paired_bootstrap(diffs, n_boot=n_boot) if diffs else None
    return summary


def _fmt(key: str, m: dict) -> str:
    if m["n"] == 0:
        return "-"
    if key in ("accuracy", "ood_accuracy", "accept_rate", "accuracy_check", "accuracy_nocheck"):
        return f"{m['mean']:.1%} ± {m['std']:.1%}"
    if key == "gain_vs_start":
        return f"{100 * m['mean']:+.1f} ± {100 * m['std']:.1f} pts"
    if key == "tokens_supervised":
        return f"{m['mean']:,.0f} ± {m['std']:,.0f}"
    if key == "ood_nll":
        return f"{m['mean']:.4f} ± {m['std']:.4f}"
    return f"{m['mean']:.2f} ± {m['std']:.2f}"


def format_study(study: dict, summary: dict) -> str:
    """study.md: the setting, mean ± std per arm, the paired differences with their intervals."""
    s = study.get("setting", {})
    metrics = CHECK_METRICS if s.get("task") == "check" else METRICS
    lines = [
        "# fastopd study: the release rule against every control",
        "",
        f"Task `{s.get('task', '?')}` (OOD: `{s.get('ood_task', '?')}`), {s.get('steps', '?')} OPD steps x "
        f"{s.get('rollouts_per_step', '?')} rollouts per run, loss `{s.get('loss', '?')}`, lr {s.get('lr', '?')} "
        f"({s.get('lr_scheduler', '?')}), "
        f"seeds {s.get('seeds', '?')}; every run starts from the same shipped student; accuracy is greedy on "
        f"{s.get('eval_problems', '?')} held-out problems of each task. Student before OPD: "
        f"{_pct(study.get('student_before', {}).get('accuracy'))} in-domain, "
        f"{_pct(study.get('student_before', {}).get('ood_accuracy'))} OOD (reference NLL "
        f"{study.get('student_before', {}).get('ood_nll') or float('nan'):.4f} nats/token).",
        "",
        "| arm | seeds | " + " | ".join(label for _, label in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for mode, rows in study["arms"].items():
        a = summary["arms"][mode]
        lines.append(f"| {mode} | {len(rows)} | " + " | ".join(_fmt(k, a[k]) for k, _ in metrics) + " |")
    above = summary.get("above_start") or {}
    if above:
        lines += ["", "Seeds that ended above the starting student: " + ", ".join(
            f"{mode} {v['seeds']} of {v['of']}" for mode, v in above.items()) + "."]
    curves = {mode: [r["curve"] for r in rows if r.get("curve")] for mode, rows in study["arms"].items()}
    if any(curves.values()):
        lines += ["", "Mean greedy in-domain accuracy at each eval point (step: accuracy, mean over seeds):", ""]
        for mode, cs in curves.items():
            if cs:
                steps = [p[0] for p in cs[0]]
                means = [np.mean([c[i][1] for c in cs if len(c) > i]) for i in range(len(steps))]
                lines.append(f"- {mode}: " + ", ".join(f"{st}: {m:.1%}" for st, m in zip(steps, means)))
    n_seeds = max((len(rows) for rows in study["arms"].values()), default=0)
    lines += ["", "Paired difference release − control over seeds (mean, 95 % percentile bootstrap interval of the "
              f"mean over seeds; with {n_seeds} seeds the interval is coarse):", "",
              "| control | Δ in-domain accuracy | Δ OOD accuracy | Δ OOD reference NLL (lower is better) |",
              "|---|---|---|---|"]
    for mode, p in summary["paired"].items():
        cells = []
        for key in ("accuracy", "ood_accuracy", "ood_nll"):
            b = p.get(key)
            if b is None:
                cells.append("-")
            elif key == "ood_nll":
                cells.append(f"{b['mean']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}] (n={b['n']})")
            else:
                cells.append(f"{b['mean']:+.1%} [{b['lo']:+.1%}, {b['hi']:+.1%}] (n={b['n']})")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if summary.get("pairs"):
        lines += ["", "Issue 24's paired differences a − b (same seed): mean, 95 % bootstrap interval over seeds "
                  "[seeds] and, for accuracies, over the held-out problems with each problem's difference averaged "
                  "over the seeds {problems} (that one shows how much the held-out sample matters, not the spread "
                  "between training seeds):", "",
                  "| a − b | " + " | ".join(label for _, label in PAIR_KEYS) + " |",
                  "|---|" + "---|" * len(PAIR_KEYS)]
        for name, cell in summary["pairs"].items():
            cells = []
            for key, _ in PAIR_KEYS:
                c = cell.get(key) or {}
                b, q = c.get("seeds"), c.get("problems")
                if b is None:
                    cells.append("-")
                    continue
                if key.startswith("accuracy"):
                    text = f"{100 * b['mean']:+.1f} pts [{100 * b['lo']:+.1f}, {100 * b['hi']:+.1f}]"
                    if q is not None:
                        text += f" {{{100 * q['lo']:+.1f}, {100 * q['hi']:+.1f}}}"
                elif key == "time_per_step":
                    text = f"{b['mean']:+.2f} [{b['lo']:+.2f}, {b['hi']:+.2f}]"
                else:
                    text = f"{b['mean']:+,.0f} [{b['lo']:+,.0f}, {b['hi']:+,.0f}]"
                cells.append(text + f" (n={b['n']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    decisions = {m: [r.get("decisions") for r in rows if r.get("decisions")] for m, rows in study["arms"].items()}
    if any(decisions.values()):
        kinds = ("on time", "early", "late", "missed fade", "false release", "kept whole", "no answer")
        lines += ["", "The rule's decisions on each arm's logged training rollouts against where the check really "
                  "begins (fastopd.demo.precondition.rule_decision; in the control arms what the rule would have "
                  "decided; share of rollouts, all seeds):", "",
                  "| arm | rollouts | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for mode, ds in decisions.items():
            if not ds:
                continue
            tot = {k: sum(d.get(k, 0) for d in ds) for k in kinds}
            n = sum(sum(d.values()) for d in ds)
            lines.append(f"| {mode} | {n:,} | " + " | ".join(f"{tot[k] / max(n, 1):.1%}" for k in kinds) + " |")
    full = {r["seed"]: r for r in study["arms"].get("full", [])}
    online = [r for r in study["arms"].get("online", []) if r["seed"] in full]
    if online:
        def ratio(key):
            v = [r[key] / full[r["seed"]][key] for r in online if r.get(key) and full[r["seed"]].get(key)]
            return (float(np.median(v)), min(v), max(v)) if v else None
        parts = []
        for key, label in (("time_per_step", "time per step"), ("tokens_generated", "tokens generated"),
                           ("teacher_tokens", "teacher tokens scored"), ("tokens_supervised", "tokens supervised")):
            r = ratio(key)
            if r:
                parts.append(f"{label} {r[0]:.2f}x (seeds {r[1]:.2f}-{r[2]:.2f})")
        lines += ["", "Online release against full OPD of the same seed (median ratio over seeds): " + ", ".join(parts)
                  + " (goals: time <= 0.6x, tokens generated <= 0.65x)."]
        tr = [r.get("max_new_tokens") for r in study["arms"].get("truncate", []) if r.get("max_new_tokens")]
        if tr:
            lines += ["", "truncate lengths (the online arm's mean generated length of the same seed, tokens): "
                      + ", ".join(str(t) for t in tr) + "."]
    fp = [r.get("fraction") for r in study["arms"].get("fixed_prefix", []) if r.get("fraction") is not None]
    if fp and s.get("task") == "check":
        lines += ["", "fixed_prefix fraction (the rule's kept fraction in the precondition, every seed): "
                  + ", ".join(f"{f:.3f}" for f in fp) + "."]
    elif fp:
        lines += ["", "fixed_prefix fractions (the release arm's mean kept fraction of the same seed): "
                  + ", ".join(f"{f:.3f}" for f in fp) + "."]
    if study.get("precondition"):
        from fastopd.demo.precondition import format_precondition

        lines += ["", format_precondition(study["precondition"])]
    if s.get("runs_trained"):
        lines += ["", f"Wall time of the last invocation ({s['runs_trained']} runs trained, the others read from "
                  f"their result.json): {s['total_time_s'] / 60:.1f} min ({s.get('threads', '?')} torch thread(s), "
                  f"{s.get('cpu_count', '?')} CPUs, shared machine)."]
    per_step = [r["time_per_step"] for rows in study["arms"].values() for r in rows if r.get("time_per_step")]
    if per_step:
        lines += ["", f"Time per OPD step over all runs: {min(per_step):.2f}-{max(per_step):.2f} s (mean "
                  f"{sum(per_step) / len(per_step):.2f} s) on the shared machine."]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{v:.1%}"


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def plot_study(study: dict, out_dir: Path, run_dirs: dict[str, list[Path]] | None = None,
               precondition_dir: Path | None = None, min_gain: float = 10.0) -> list[Path]:
    """accuracy.png (per arm, each seed a dot, in-domain and OOD); with run folders, margin_profile.png and
    bic_gains.png of the first seed of each arm (and the precondition's rollouts, "before OPD")."""
    from fastopd.train.report import _pyplot, load_run, plot_gain_histogram, plot_margin_profile

    plt = _pyplot()
    out_dir = Path(out_dir)
    modes = list(study["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, (("accuracy", "in-domain accuracy"), ("ood_accuracy", "OOD accuracy"))):
        for i, mode in enumerate(modes):
            vals = [r[key] for r in study["arms"][mode] if r.get(key) is not None]
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
            ax.plot(i + jitter, vals, "o", color="tab:blue" if mode == "release" else "tab:gray", ms=6, alpha=0.8)
            if vals:
                ax.hlines(np.mean(vals), i - 0.25, i + 0.25, color="black", lw=2)
        before = study.get("student_before", {}).get(key)
        if before is not None:
            ax.axhline(before, color="tab:red", ls="--", lw=1, label="student before OPD")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes, rotation=20)
        ax.set_ylabel(label)
        ax.set_title(f"{label}: each dot a seed, bar the mean", fontsize=10)
    fig.tight_layout()
    paths = [out_dir / "accuracy.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    curves = {m: [r["curve"] for r in study["arms"][m] if r.get("curve")] for m in modes}
    if any(curves.values()):  # curves.png: mean greedy in-domain accuracy over the eval points, per arm
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for mode, cs in curves.items():
            if not cs:
                continue
            steps = [p[0] for p in cs[0]]
            vals = np.array([[c[i][1] for i in range(len(steps))] for c in cs if len(c) == len(steps)])
            ax.plot(steps, 100 * vals.mean(0), "o-", lw=2.5 if mode == "release" else 1.2, label=mode)
        before = study.get("student_before", {}).get("accuracy")
        if before is not None:
            ax.axhline(100 * before, color="gray", ls="--", lw=1, label="student before")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("greedy in-domain accuracy (%), mean over seeds")
        setting = study.get("setting", {})
        ax.set_title(f"Mean greedy held-out accuracy of each arm over training\n(fastopd study, "
                     f"{setting.get('task', '?')} task, {len(setting.get('seeds', [])) or '?'} seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / "curves.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if run_dirs:
        # per arm, its first run whose rollouts are on disk (a study resumed in a clone has the runs' results but
        # not their rollouts, which are not committed); with none, the figures already there are left as they are
        runs = {}
        if precondition_dir is not None and (Path(precondition_dir) / "rollouts.jsonl").is_file():
            runs["before OPD"] = load_run(precondition_dir)
        for mode, dirs in run_dirs.items():
            for seed_row, run_dir in zip(study["arms"][mode], dirs):
                if (Path(run_dir) / "rollouts.jsonl").is_file():
                    runs[f"{mode} (seed {seed_row['seed']})"] = load_run(run_dir)
                    break
        if any(k != "before OPD" for k in runs):
            paths.append(plot_margin_profile(runs, out_dir / "margin_profile.png"))
            gain_runs = {k: v for k, v in runs.items() if k == "before OPD" or k.startswith("release")}
            paths.append(plot_gain_histogram(gain_runs, out_dir / "bic_gains.png", min_gain=min_gain))
    return paths


# ----------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------


def atomic_write_text(path, text: str) -> None:
    """:func:`fastopd.train.checkpoint.atomic_write_text` (imported when used: it imports torch)."""
    from fastopd.train.checkpoint import atomic_write_text as write

    write(path, text)


def study_settings(cfg, task: str) -> dict:
    """What settings.json records: the task and :data:`STUDY_FIELDS` of the study's shared config."""
    return {"task": task, **{name: getattr(cfg, name) for name in STUDY_FIELDS}}


def check_study_settings(out_dir: Path, settings: dict) -> None:
    """Refuse a study folder made with other settings (one line naming each difference); nothing to check in a
    new folder. A folder that holds a study's files but no settings.json (an older version) is refused too:
    what its runs were trained with is unknown."""
    from fastopd.train.outdir import setting_differences

    path = out_dir / "settings.json"
    if not path.is_file():
        if any((out_dir / name).exists() for name in ("runs", "baseline.json", "precondition", "study.json")):
            raise ValueError(f"{out_dir} holds a study without a record of its settings (no settings.json: made "
                             "by an older fastopd), so its runs may have other settings; choose another --out")
        return
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not the record of a study's settings (a JSON object); choose another --out")
    diffs = setting_differences(saved, settings, fields=tuple(settings))
    if diffs:
        raise ValueError(f"{out_dir} holds a study of other settings ({'; '.join(diffs)}): its runs, baseline and "
                         "precondition were made with those; choose another --out, or delete the folder to start "
                         "over")


def read_json(path: Path):
    """The JSON of ``path``; a file that is not JSON is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__})") from None


def read_done(path: Path, what: str):
    """A finished step's JSON (result.json, baseline.json, precondition.json), or None when it is missing or
    torn (said, and the step redone)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as e:
        print(f"fastopd study: {e}; {what} is redone", flush=True)
        return None


def _run_one(cfg, sched, run_dir: Path, progress: bool) -> dict:
    """Train one arm (from scratch) and grade it; write and return its result row."""
    from fastopd.demo.demo import arm_summary, ood_metrics
    from fastopd.train.report import load_run
    from fastopd.train.trainer import train

    summary = train(dataclasses.replace(cfg, output_dir=str(run_dir), overwrite=True, progress=progress))
    run = load_run(run_dir)
    a = arm_summary(summary, run, run_dir)
    ood = ood_metrics(run_dir / "final", cfg, sched) if Path(sched["ood_eval"]).is_file() else {}
    row = {"seed": cfg.seed, "accuracy": a["accuracy_after"], "ood_accuracy": ood.get("accuracy"),
           "ood_nll": ood.get("nll"),
           "tokens": a["tokens"], "tokens_supervised": a["tokens_supervised"], "accept_rate": a["accept_rate"],
           "gain_mean": a["gain_mean"], "time_per_step": a["time_per_step"], "kept_fraction": a["kept_fraction"],
           "share_rule": a.get("share_rule"), "mode": cfg.label,
           "curve": [[int(st), float(acc)] for st, acc in a["eval_curve"]],
           "max_new_tokens": cfg.max_new_tokens}
    row["tokens_generated"], row["teacher_tokens"] = a["tokens_generated"], a["teacher_tokens"]
    row["generated_per_rollout"] = a["generated_per_rollout"]
    if cfg.choices[1] == "fixed_prefix":
        row["fraction"] = cfg.fraction
    if sched.get("task") == "check":  # issue 24: per-problem grades (split by check) and the rule's decisions
        from fastopd.demo.check_task import has_check
        from fastopd.demo.precondition import rule_decision
        from fastopd.train.data import load_prompts

        rows = load_prompts(cfg.eval_data)[:cfg.eval_size or None]
        row["correct"] = grade_per_problem(run_dir / "final", cfg, rows)
        flags = np.array([has_check(r["prompt"]) for r in rows])
        corr = np.array(row["correct"], dtype=np.float64)
        row["accuracy"] = float(corr.mean())
        row["accuracy_check"] = float(corr[flags].mean()) if flags.any() else None
        row["accuracy_nocheck"] = float(corr[~flags].mean()) if (~flags).any() else None
        kinds: dict = {}
        for rec in run["rollouts"]:
            k = rule_decision(rec)["kind"]
            kinds[k] = kinds.get(k, 0) + 1
        row["decisions"] = kinds
    atomic_write_text(run_dir / "result.json", json.dumps(row, indent=1) + "\n")
    return row


def grade_per_problem(model_dir, cfg, rows: list[dict]) -> list[int]:
    """Greedy 0/1 grade of a saved model on each row (``{"prompt", "answer"}``), in order: the trainer's evaluation
    (same generation, verifier and batch size) kept per problem, for per-problem paired intervals."""
    import torch

    from fastopd.train.models import load_model, load_tokenizer, quiet_transformers
    from fastopd.train.rollouts import eos_ids_of, generate_completions
    from fastopd.train.verify import get_verifier

    tok = load_tokenizer(cfg.tokenizer)
    check = get_verifier(cfg.verifier)
    with quiet_transformers():
        model = load_model(str(model_dir), dtype=torch.float32, attn="sdpa")
    model.eval()
    out = []
    bs = cfg.eval_batch_size
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]
            ro = generate_completions(model, tok, [r["prompt"] for r in chunk], eos_ids=eos_ids_of(tok, model),
                                      max_new_tokens=cfg.max_new_tokens, do_sample=False)
            out += [int(bool(check(t, r["answer"]))) for r, t in zip(chunk, ro.texts)]
    return out


def run_study(out_dir: str | Path = "fastopd-study", *, seeds: int | list[int] = 3, steps: int | None = None,
              task: str = "long", arms: tuple[str, ...] = ARMS, quick: bool = False, progress: bool = True,
              num_threads: int = 0, precondition: bool = True, jobs: int = 1, eval_every: int | None = None) -> dict:
    """Run (or finish) the study in ``out_dir`` and write study.json, study.md and the plots; return study.json.

    ``seeds``: a count (seeds 0..n-1) or a list. ``steps`` overrides the demo schedule's steps per run.
    ``eval_every`` overrides the schedule's eval interval (0: the final evaluation only). ``jobs``: runs trained at once, each in its own process with ``num_threads`` torch threads (one per core is
    the fastest setting for these models).
    """
    import os

    import torch

    from fastopd.demo.demo import (ARM_FIELDS, DEFAULT_THREADS, baseline_accuracy, demo_config, in_processes,
                                   matched_fields, matched_needs, run_precondition)

    from fastopd.demo.demo import TASKS

    def count(name, value, least, optional=False):
        if optional and value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")

    # every argument is checked before anything is done or any folder is made
    count("jobs", jobs, 1)
    count("steps", steps, 1, optional=True)
    count("eval_every", eval_every, 0, optional=True)
    count("num_threads", num_threads, 0)
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    bad = [a for a in arms if a not in ARMS]
    if bad or "release" not in arms:
        raise ValueError(f"arms must be a subset of {ARMS} that includes 'release', got {arms!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if not seed_list or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seed_list):
        raise ValueError(f"seeds must be a positive count or a non-empty list of ints >= 0, got {seeds!r}")
    out_dir = Path(out_dir)
    saved_task = None
    if (out_dir / "settings.json").is_file():  # another task: refused before its data is written
        saved = read_json(out_dir / "settings.json")
        saved_task = saved.get("task") if isinstance(saved, dict) else None
    if saved_task is not None and saved_task != task:
        raise ValueError(f"{out_dir} holds a study of other settings (task {saved_task!r} -> {task!r}): its runs, "
                         "baseline and precondition were made with those; choose another --out, or delete the "
                         "folder to start over")
    num_threads = num_threads or DEFAULT_THREADS
    t_start = time.perf_counter()
    cfg, sched = demo_config(out_dir, quick=quick, steps=steps, progress=progress, num_threads=num_threads, task=task)
    cfg = dataclasses.replace(cfg, log_rollouts=True)  # the schedule's eval points: each run's curve
    if eval_every is not None:
        cfg = dataclasses.replace(cfg, eval_every=eval_every)
    cfg.validate()
    settings = study_settings(cfg, task)
    check_study_settings(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "settings.json", json.dumps(settings, indent=1) + "\n")
    torch.set_num_threads(num_threads)

    base_path = out_dir / "baseline.json"
    base = read_done(base_path, "the baseline")
    if base is None:
        b = baseline_accuracy(cfg, sched)
        base = {"student_before": {"accuracy": b["student"]["accuracy"],
                                   "ood_accuracy": b["student"].get("ood", {}).get("accuracy"),
                                   "ood_nll": b["student"].get("ood", {}).get("nll")},
                "teacher": {"accuracy": b["teacher"]["accuracy"],
                            "ood_accuracy": b["teacher"].get("ood", {}).get("accuracy")},
                "eval_problems": b["student"]["total"]}
        atomic_write_text(base_path, json.dumps(base, indent=1) + "\n")
    pre = None
    if precondition:
        pre = read_done(out_dir / "precondition" / "precondition.json", "the precondition") or run_precondition(
            cfg, sched, out_dir / "precondition", progress=progress)

    results: dict[str, list[dict]] = {m: [] for m in arms}
    run_dirs: dict[str, list[Path]] = {m: [] for m in arms}
    needs = matched_needs(task, pre)  # runs that set their schedule from another arm of the same seed come second
    first = [m for m in arms if m not in needs]
    second = [m for m in arms if m in needs]
    all_jobs = [(seed, mode) for seed in seed_list for mode in first + second]
    done_before = sum((out_dir / "runs" / f"{m}-s{s}" / "result.json").is_file() for s, m in all_jobs)
    print(f"fastopd study: {len(arms)} arms x {len(seed_list)} seeds, {sched['steps']} steps x "
          f"{sched['prompts_per_step'] * sched['num_samples']} rollouts per run, {jobs} parallel job(s); "
          f"{done_before} of {len(all_jobs)} runs already finished -> {out_dir}", flush=True)
    start = base["student_before"]["accuracy"]
    rows: dict[tuple, dict] = {}

    def job_cfg(seed, mode):
        done = {m: rows[(seed, m)] for m in arms if (seed, m) in rows}
        return dataclasses.replace(cfg, **ARM_FIELDS[mode], **matched_fields(mode, task, pre, done), seed=seed)

    trained = 0
    for phase in (first, second):
        todo = []
        for seed in seed_list:
            for mode in phase:
                row = read_done(out_dir / "runs" / f"{mode}-s{seed}" / "result.json", f"run {mode}-s{seed}")
                if row is not None:
                    rows[(seed, mode)] = row
                else:
                    todo.append((seed, mode))
        trained += len(todo)
        # train this phase (each run writes its result.json), then read the rows back in seed order
        names = [f"{m}-s{s}" for s, m in todo]
        in_processes(_run_one, [(job_cfg(s, m), sched, out_dir / "runs" / f"{m}-s{s}", progress and jobs == 1)
                                for s, m in todo], jobs=jobs, threads=num_threads,
                     before=lambda i: print(f"--- {names[i]}", flush=True),
                     after=lambda i, row: print(
                         f"--- {names[i]}: accuracy {row['accuracy']:.1%}, OOD {_pct(row['ood_accuracy'])}, "
                         f"supervised {row['tokens_supervised']:,} of {row['tokens']:,}, "
                         f"{row['time_per_step']:.2f} s/step", flush=True),
                     desc="study runs" if progress else None)
        for seed, mode in todo:
            rows[(seed, mode)] = read_json(out_dir / "runs" / f"{mode}-s{seed}" / "result.json")
    for seed in seed_list:
        for mode in arms:
            row = rows[(seed, mode)]
            if row.get("curve") and row["curve"][0][0] != 0:
                row["curve"] = [[0, start]] + row["curve"]
            results[mode].append(row)
            run_dirs[mode].append(out_dir / "runs" / f"{mode}-s{seed}")

    study = {
        "arms": {m: [{k: r.get(k) for k in ROW_KEYS} | {k: r[k] for k in ("fraction", "accuracy_check",
                                                                          "accuracy_nocheck", "decisions", "correct")
                                                          if k in r}
                     for r in results[m]] for m in arms},
        "student_before": base["student_before"], "teacher": base["teacher"], "precondition": pre,
        "setting": {"task": task, "ood_task": sched["ood_task"], "steps": sched["steps"],
                    "rollouts_per_step": sched["prompts_per_step"] * sched["num_samples"], "loss": cfg.loss,
                    "lr": cfg.lr, "lr_scheduler": cfg.lr_scheduler, "seeds": seed_list, "eval_problems": base["eval_problems"],
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "total_time_s": time.perf_counter() - t_start, "runs_trained": trained},
    }
    summary = aggregate(study["arms"], start=start, metrics=CHECK_METRICS if task == "check" else METRICS)
    if task == "check":
        from fastopd.demo.check_task import has_check
        from fastopd.train.data import load_prompts

        flags = [has_check(r["prompt"]) for r in load_prompts(cfg.eval_data)[:cfg.eval_size or None]]
        summary["pairs"] = paired_pairs(study["arms"], with_check=flags)
    study["summary"] = summary
    atomic_write_text(out_dir / "study.json", json.dumps(study, indent=1) + "\n")
    md = format_study(study, summary)
    atomic_write_text(out_dir / "study.md", md)
    figures = plot_study(study, out_dir, run_dirs, out_dir / "precondition" if pre else None, min_gain=cfg.min_gain)
    print("\n" + md + "\nFigures: " + ", ".join(str(p) for p in figures), flush=True)
    return study
