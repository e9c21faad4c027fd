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

__all__ = ["measure_precondition", "summarise_records", "TARGETS", "CHECK_TARGETS", "fade_segment",
           "rule_decision", "summarise_check_split", "format_check_split"]

TARGETS = {"margin_ratio": 1.5, "accept_rate": 0.5}
"""The issue's targets for the demo's long task: first/last-quarter margin ratio >= 1.5, accept rate >= 50 %."""
CHECK_TARGETS = {"accept_with_check": 0.8, "accept_without_check": 0.1, "release_iqr": 0.25}
"""Issue 24's targets on the check task (:mod:`fastopd.demo.check_task`): the rule accepts >= 80 % of the rollouts
of problems with a check and <= 10 % of those without one; the interquartile range of the per-rollout release
fractions (accepted rollouts) is >= 0.25."""


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
                "correct": correct, "text": ro.texts[b], "prompt": prompts[idx[b]],
            })
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    summary = summarise_records(records)
    from fastopd.demo import check_task

    if all(_formatted_check(p) for p in prompts):  # the check task: issue 24's split by the prompt
        summary["check_split"] = summarise_check_split(
            records, [check_task.has_check(r["prompt"]) for r in records], fixed_fraction=summary["kept_fraction"])
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


def fade_segment(text: str) -> int | None:
    """The id of the first sentence segment after ``The sum is \\boxed{..}.`` in a check-task completion (the
    segments of docs/formulas.md §2: ``fastopd.segment.sentence_spans``), i.e. where the fade begins: the number
    of segments when nothing follows the boxed sum (no check), None when the text has no boxed sum."""
    import re

    from fastopd.segment import sentence_spans

    m = re.search(r"\\boxed\{[^}]*\}\.?", text)
    if m is None:
        return None
    spans = sentence_spans(text)
    return sum(1 for a, _ in spans if a < m.end())


def rule_decision(rec: dict) -> dict:
    """What the rule did on one check-task rollout record, against where the fade really begins (:func:`fade_segment`
    of its text): ``kind`` is ``kept whole`` (no check written, not accepted), ``false release`` (no check
    written, accepted), ``missed fade`` (a check written, not accepted), ``on time`` (released at the check's first
    segment), ``early`` (released inside the derivation) or ``late`` (released inside the check), or ``no answer``
    (no boxed sum); ``fade_fraction`` is the token fraction before the fade (1.0 without a check), ``release_fraction``
    the rule's (1.0 when not accepted), ``offset`` their difference in segments (release - fade) when accepted."""
    from fastopd.train.report import release_fraction

    seg = np.asarray(rec["segments"], dtype=np.int64)
    n_seg = int(seg.max()) + 1 if seg.size else 0
    fade = fade_segment(rec["text"])
    out = {"release_fraction": release_fraction(rec), "fade_fraction": float("nan"), "offset": None}
    if fade is None:
        return dict(out, kind="no answer")
    out["fade_fraction"] = float((seg < fade).mean()) if seg.size else float("nan")
    has_fade = fade < n_seg
    if not rec["accepted"]:
        return dict(out, kind="missed fade" if has_fade else "kept whole")
    if not has_fade:
        return dict(out, kind="false release")
    r = int(rec["release_segment"])
    out["offset"] = r - fade
    return dict(out, kind="on time" if r == fade else ("early" if r < fade else "late"))


def summarise_check_split(records: list[dict], with_check: list[bool], fixed_fraction: float | None = None) -> dict:
    """Issue 24's precondition figures on the check task, per group of prompts (``with_check[i]``: the prompt of
    ``records[i]`` asks for a check): the accept rate of each group; over the accepted rollouts the release
    fractions' quartiles and interquartile range; over all rollouts (1.0 where not accepted) too; the rule's
    decisions against the true fade (:func:`rule_decision`, counts per kind) and the correlation between the
    release fraction and the fade fraction over rollouts with a check. With ``fixed_fraction`` (the rule's kept
    fraction: the ``fixed_prefix`` control), the same comparison for a cut at that fraction of every rollout:
    ``fixed_cut`` = the share of the rollouts that wrote a check where it cuts into the derivation (before the
    fade) and its mean |cut - fade|, and the share of the forced tokens it drops from rollouts that wrote none."""
    if len(records) != len(with_check) or not records:
        raise ValueError(f"records and with_check must be non-empty and of one length, got {len(records)} and "
                         f"{len(with_check)}")
    flags = np.asarray(with_check, dtype=bool)
    acc = np.array([bool(r["accepted"]) for r in records])
    dec = [rule_decision(r) for r in records]
    rel = np.array([d["release_fraction"] for d in dec])
    fade = np.array([d["fade_fraction"] for d in dec])

    def quartiles(v):
        v = v[np.isfinite(v)]
        if not v.size:
            return {"q1": float("nan"), "median": float("nan"), "q3": float("nan"), "iqr": float("nan"), "n": 0}
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        return {"q1": float(q1), "median": float(med), "q3": float(q3), "iqr": float(q3 - q1), "n": int(v.size)}

    kinds = {}
    for d in dec:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    both = flags & acc & np.isfinite(fade) & (fade < 1)
    corr = float(np.corrcoef(rel[both], fade[both])[0, 1]) if both.sum() > 2 else float("nan")
    offsets = [d["offset"] for d in dec if d["offset"] is not None]
    # by what the rollout wrote (a student may check where none was asked, or skip an asked check)
    wrote = np.array([d["kind"] in ("on time", "early", "late", "missed fade") for d in dec])
    none = np.array([d["kind"] in ("kept whole", "false release") for d in dec])
    fixed = None
    if fixed_fraction is not None:
        f = float(fixed_fraction)
        wf = wrote & np.isfinite(fade)
        fixed = {"fraction": f,
                 "cuts_derivation": float((f < fade[wf]).mean()) if wf.any() else float("nan"),
                 "mean_abs": float(np.mean(np.abs(f - fade[wf]))) if wf.any() else float("nan"),
                 "dropped_without_check": 1.0 - f if none.any() else float("nan")}
    return {
        "fixed_cut": fixed,
        "accept_check_written": float(acc[wrote].mean()) if wrote.any() else float("nan"),
        "accept_no_check_written": float(acc[none].mean()) if none.any() else float("nan"),
        "rollouts_check_written": int(wrote.sum()), "rollouts_no_check_written": int(none.sum()),
        "rollouts_with_check": int(flags.sum()), "rollouts_without_check": int((~flags).sum()),
        "accept_with_check": float(acc[flags].mean()) if flags.any() else float("nan"),
        "accept_without_check": float(acc[~flags].mean()) if (~flags).any() else float("nan"),
        "release_accepted": quartiles(rel[acc]),
        "release_all": quartiles(rel),
        "fade_with_check": quartiles(fade[flags & (fade < 1)]),
        "decisions": kinds,
        "offset_segments_mean": float(np.mean(offsets)) if offsets else float("nan"),
        "release_vs_fade_corr": corr,
        "release_vs_fade_mean_abs": float(np.mean(np.abs(rel[both] - fade[both]))) if both.any() else float("nan"),
    }


def format_check_split(c: dict) -> str:
    """One paragraph of :func:`summarise_check_split`'s figures against :data:`CHECK_TARGETS`."""
    t = CHECK_TARGETS
    ok = lambda good: "meets" if good else "misses"  # noqa: E731
    ra, fa = c["release_accepted"], c["fade_with_check"]
    dec = ", ".join(f"{k} {v}" for k, v in sorted(c["decisions"].items(), key=lambda kv: -kv[1]))
    return (f"Split by the prompt: the rule accepts {c['accept_with_check']:.1%} of the {c['rollouts_with_check']} "
            f"rollouts of problems with a check (target >= {t['accept_with_check']:.0%}: "
            f"{ok(c['accept_with_check'] >= t['accept_with_check'])}) and {c['accept_without_check']:.1%} of the "
            f"{c['rollouts_without_check']} without one (target <= {t['accept_without_check']:.0%}: "
            f"{ok(c['accept_without_check'] <= t['accept_without_check'])}). By what the rollout wrote: "
            f"{c['accept_check_written']:.1%} of the {c['rollouts_check_written']} that wrote a check after a boxed "
            f"sum, {c['accept_no_check_written']:.1%} of the {c['rollouts_no_check_written']} that ended at it. "
            f"Release fractions of the accepted "
            f"rollouts: quartiles {ra['q1']:.2f} / {ra['median']:.2f} / {ra['q3']:.2f}, interquartile range "
            f"{ra['iqr']:.2f} (target >= {t['release_iqr']}: {ok(ra['iqr'] >= t['release_iqr'])}); over all rollouts "
            f"(1.0 when kept whole) {c['release_all']['iqr']:.2f}. Where the check really begins in the rollouts with "
            f"one: quartiles {fa['q1']:.2f} / {fa['median']:.2f} / {fa['q3']:.2f}. Release against the true fade "
            f"(accepted rollouts with a check): correlation {c['release_vs_fade_corr']:.2f}, mean |difference| "
            f"{c['release_vs_fade_mean_abs']:.3f} of the response, mean offset {c['offset_segments_mean']:+.2f} "
            f"segments. Decisions: {dec}."
            + (f" A fixed cut at {c['fixed_cut']['fraction']:.2f} of every rollout (the rule's kept fraction) falls "
               f"inside the derivation of {c['fixed_cut']['cuts_derivation']:.0%} of the rollouts that wrote a check "
               f"(mean |cut - fade| {c['fixed_cut']['mean_abs']:.3f} of the response) and drops the last "
               f"{c['fixed_cut']['dropped_without_check']:.0%} of every rollout that wrote none."
               if c.get("fixed_cut") else ""))


def _formatted_check(prompt: str) -> bool:
    from fastopd.demo import check_task

    try:
        check_task.parse_problem(prompt)
    except ValueError:
        return False
    return True


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
               + " ".join(f"{v:.2f}" for v in p["profile"]["mean"]) + "." if p.get("profile") else "")
            + (" " + format_check_split(p["check_split"]) if p.get("check_split") else ""))
