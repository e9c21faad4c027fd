"""The paper's precondition, measured: does the teacher's margin fade along the student's own rollouts?

Before any OPD step, the student samples ``n_rollouts`` completions of training prompts (temperature 1, as
the trainer does), the teacher scores them, and the release rule (:class:`fastopd.ReleaseRule`, mode
``release``) decides where each one would be released. :func:`measure_precondition` reports:

- ``margin_ratio``: the normalised teacher margin (each rollout's m_t divided by its own mean, as in
  :func:`fastopd.train.report.margin_profile`), mean over the first quarter of the response divided by the
  mean over the last quarter (the paper's Figure 2 in one number; > 1 means the margin fades);
- ``accept_rate``: the fraction of rollouts whose BIC gain exceeds ``min_gain`` (the paper's Figure 3: 79 %);
- ``gain_mean``: the mean BIC gain over rollouts that have a candidate split (the paper: 24.0);
- ``release_position``: the mean kept fraction (tokens before the release point / tokens) of the accepted
  rollouts; ``kept_fraction``: tokens the rule keeps / all tokens;
- ``profile``: the 20-bin normalised margin profile (x, mean, 95 % half-width).

The per-rollout records (``rollouts.jsonl`` format of the trainer) can be written for the report's plots.
Nothing here has a formula of its own: token statistics, segments and the scan are fastopd's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["measure_precondition", "summarise_records", "TARGETS"]

TARGETS = {"margin_ratio": 1.5, "accept_rate": 0.5}
"""The issue's targets for the demo's long task: first/last-quarter margin ratio >= 1.5, accept rate >= 50 %."""


def summarise_records(records: list[dict], bins: int = 20) -> dict:
    """The precondition figures of a list of per-rollout records (``rollouts.jsonl`` rows)."""
    from fastopd.common import release_means, release_sums
    from fastopd.train.report import margin_profile, release_fraction
    from fastopd.train.runlog import as_float

    if not records:
        raise ValueError("records must hold at least one rollout record, got an empty list")
    _, quarters, _ = margin_profile(records, bins=4)
    x, mean, half = margin_profile(records, bins=bins)
    gains = np.array([r["gain"] for r in records], dtype=np.float64)
    finite = np.isfinite(gains)
    tokens = sum(r["length"] for r in records)
    kept = sum(round(as_float(r["kept_fraction"]) * r["length"]) for r in records
               if math.isfinite(as_float(r["kept_fraction"])))
    rule = release_means(release_sums(gains, [r["accepted"] for r in records],
                                      [release_fraction(r) for r in records], tokens, kept))
    return {
        "rollouts": len(records),
        "margin_first_quarter": float(quarters[0]),
        "margin_last_quarter": float(quarters[3]),
        "margin_ratio": float(quarters[0] / quarters[3]) if quarters[3] > 0 else float("inf"),
        "accept_rate": rule["accept_rate"],
        "gain_mean": rule["gain_mean"],
        "gain_median": float(np.median(gains[finite])) if finite.any() else float("nan"),
        "release_position": rule["release_position"],
        "kept_fraction": rule["kept_fraction"],
        "mean_length": tokens / len(records),
        "mean_segments": float(np.mean([len(r["series"]) for r in records])),
        "profile": {"x": x.round(4).tolist(), "mean": np.round(mean, 4).tolist(), "half": np.round(half, 4).tolist()},
    }


@torch.no_grad()
def measure_precondition(student, teacher, tokenizer, prompts: list[str], *, n_rollouts: int = 256,
                         batch_size: int = 64, max_new_tokens: int = 192, temperature: float = 1.0, k: int = 16,
                         min_segments: int = 2, min_gain: float = 10.0, seed: int = 0, answers: list | None = None,
                         verifier: str = "boxed", out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Sample ``n_rollouts`` rollouts of the student (cycling over ``prompts``), score them, summarise.

    ``student``/``teacher`` are loaded models (eval mode is set here), ``tokenizer`` their shared tokenizer
    (:func:`fastopd.train.models.load_tokenizer`). With ``out_dir`` the records go to
    ``out_dir/rollouts.jsonl`` and the summary to ``out_dir/precondition.json``. Returns the summary of
    :func:`summarise_records` plus ``time_s`` and the settings.
    """
    from fastopd.release import ReleaseRule
    from fastopd.stats import token_stats
    from fastopd.train.rollouts import add_segments, completion_logits, eos_ids_of, generate_completions
    from fastopd.train.runlog import json_line

    if not isinstance(n_rollouts, int) or n_rollouts < 1:
        raise ValueError(f"n_rollouts must be a positive int, got {n_rollouts!r}")
    if not prompts:
        raise ValueError("prompts must be a non-empty list of prompt strings")
    check = None
    if answers is not None:
        from fastopd.train.verify import get_verifier

        check = get_verifier(verifier)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    student.eval()
    teacher.eval()
    eos_ids = eos_ids_of(tokenizer, student)
    rule = ReleaseRule(mode="release", k=k, temperature=1.0, min_segments=min_segments, min_gain=min_gain)
    vocab = len(tokenizer)
    records: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_rollouts, desc="precondition (student rollouts)", dynamic_ncols=True)
    i = 0
    while len(records) < n_rollouts:
        n = min(batch_size, n_rollouts - len(records))
        idx = [(i + j) % len(prompts) for j in range(n)]
        i += n
        ro = generate_completions(student, tokenizer, [prompts[j] for j in idx], eos_ids=eos_ids,
                                  max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature)
        add_segments(ro, tokenizer)
        stats = token_stats(completion_logits(student, ro), completion_logits(teacher, ro), ro.targets, k=k,
                            vocab_size=vocab)
        dec = rule.from_margins(stats.margins, ro.segment_ids, stats.valid)
        margins = stats.margins.float().cpu().numpy()
        valid = ro.valid.cpu().numpy()
        seg = ro.segment_ids.cpu().numpy()
        offs = dec.series.offsets
        for b in range(n):
            correct = bool(check(ro.texts[b], answers[idx[b]])) if check is not None else None
            records.append({
                "step": 0, "length": int(valid[b].sum()),
                "margins": np.round(margins[b][valid[b]].astype(np.float64), 5).tolist(),
                "segments": seg[b][valid[b]].tolist(),
                "series": np.round(dec.series.values[offs[b]:offs[b + 1]], 5).tolist(),
                "gain": float(dec.scan.gain[b]), "accepted": bool(dec.scan.accepted[b]),
                "release_segment": int(dec.release_segment[b]), "release_fraction": float(dec.release_fraction[b]),
                "kept_fraction": float(dec.kept_fraction[b]),
                "correct": correct, "text": ro.texts[b],
            })
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    summary = summarise_records(records)
    answered = [r["correct"] for r in records if r["correct"] is not None]
    summary.update(sample_accuracy=float(np.mean(answered)) if answered else float("nan"), k=k, min_gain=min_gain,
                   min_segments=min_segments, temperature=temperature, seed=seed,
                   time_s=time.perf_counter() - t_start)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "rollouts.jsonl").open("w") as f:
            for r in records:
                f.write(json_line(r) + "\n")
        from fastopd.train.checkpoint import atomic_write_text

        atomic_write_text(out / "precondition.json", json.dumps(summary, indent=1) + "\n")
    return summary


def format_precondition(p: dict) -> str:
    """One paragraph for the terminal and table.md, with the targets."""
    ok = lambda v, t: "meets" if v >= t else f"misses by {t - v:.2f}"  # noqa: E731
    return (f"Precondition on {p['rollouts']} student rollouts before OPD (mean {p['mean_length']:.0f} tokens, "
            f"{p['mean_segments']:.1f} sentence segments): normalised teacher margin first quarter "
            f"{p['margin_first_quarter']:.2f} / last quarter {p['margin_last_quarter']:.2f} = "
            f"{p['margin_ratio']:.2f} (target >= {TARGETS['margin_ratio']}: {ok(p['margin_ratio'], TARGETS['margin_ratio'])}); "
            f"accept rate at min_gain {p['min_gain']:g} {p['accept_rate']:.1%} (target >= "
            f"{TARGETS['accept_rate']:.0%}: {ok(p['accept_rate'], TARGETS['accept_rate'])}); mean BIC gain "
            f"{p['gain_mean']:.1f} (median {p['gain_median']:.1f}); mean release position "
            f"{p['release_position']:.2f} of the response; the rule keeps {p['kept_fraction']:.0%} of the tokens."
            + (f" Normalised margin profile, {len(p['profile']['mean'])} bins from the start to the end of the "
               "response: "
               + " ".join(f"{v:.2f}" for v in p["profile"]["mean"]) + "." if p.get("profile") else ""))
