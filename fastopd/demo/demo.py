"""``fastopd demo``: on-policy distillation with and without the release rule, on a CPU, in minutes.

Uses the shipped tiny Qwen3 teacher and student (``fastopd/assets/demo``, built by
``scripts/build_demo_assets.py``, trained on both tasks) on the long-response task
(:mod:`fastopd.demo.long_task`, the default) or the short arithmetic task (``--task arithmetic``,
:mod:`fastopd.demo.task`):

1. greedy accuracy of the teacher and of the student on held-out problems of both tasks (the other task is
   the out-of-domain one);
2. the precondition (:mod:`fastopd.demo.precondition`): 256 of the student's own rollouts scored by the
   teacher before OPD: first/last-quarter margin ratio, accept rate, mean gain, release position;
3. two OPD runs from the same student, the same prompts and the same seed: the ``full`` control (every
   token supervised) and the release rule (``release``: prefix kept, suffix released);
4. a table (teacher; student before; after full OPD; after release-rule OPD; in-domain and OOD accuracy,
   accept rate, mean gain, kept fraction, tokens supervised, time per step and the rule's share of it),
   written as ``table.md`` / ``table.json``, and the figures of :mod:`fastopd.train.report` (the margin
   profile and gain histogram include the precondition's rollouts, "before OPD").

Nothing is downloaded. ``--quick`` runs a shorter schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from fastopd.train.config import TrainConfig

ARMS = (("full", "full OPD (every token)"), ("release", "release-rule OPD (prefix only)"),
        ("fixed_prefix", "fixed cut (same kept fraction on every rollout)"),
        ("online", "online release (rollouts stop at the release)"),
        ("truncate", "fixed budget (every rollout stops at online's mean length)"),
        ("sft", "SFT on teacher samples (baseline)"))
"""The demo's arms, in table order. ``full`` and ``release`` always run; the others where the schedule lists them
(``SCHEDULES[task][kind]["arms"]``): the matched controls of the rule (``fixed_prefix``: the rule's mean kept
fraction cut from every rollout; ``truncate``: a fixed length budget at the online arm's mean generated length),
online release, and the baseline OPD has to beat per rollout, ``sft``."""
# Each arm as the trainer's three choices (docs/formulas.md §8): a ``mode`` shorthand, or the fields themselves.
# ``truncate`` is the student sampling with a length budget and every token counted. The study (fastopd.demo.study)
# trains the same arms.
ARM_FIELDS = {arm: {"mode": arm} for arm in ("release", "full", "fixed_prefix", "random", "shuffled", "sft", "online")}
ARM_FIELDS["truncate"] = {"mode": None, "sampler": "student", "weights": "full"}
MATCHED = {"fixed_prefix": "release", "truncate": "online"}
"""A matched control and the arm of the same seed whose result sets it: ``fixed_prefix``'s fraction is the release
arm's mean kept fraction (on the check task, where the study fixes it once for every seed, the precondition's),
``truncate``'s budget the online arm's mean generated length (:func:`matched_fields`)."""


def schedule_arms(sched: dict) -> list[str]:
    """The arms a schedule trains (``SCHEDULES[task][kind]``), in table order: ``full`` and ``release`` always,
    then those its ``arms`` lists."""
    wanted = sched.get("arms", ())
    return [arm for arm, _ in ARMS if arm in ("full", "release") or arm in wanted]


def matched_fields(arm: str, task: str, pre: dict | None, done: dict[str, dict]) -> dict:
    """The TrainConfig fields that match control ``arm`` to the rule (:data:`MATCHED`); ``{}`` for other arms.

    ``done`` maps an arm of the same seed to its result (``kept_fraction``, ``generated_per_rollout``), ``pre`` is
    the precondition's summary (its ``kept_fraction`` sets ``fixed_prefix`` on the check task)."""
    if arm == "fixed_prefix":
        frac = pre["kept_fraction"] if task == "check" else done["release"]["kept_fraction"]
        return {"fraction": float(min(1.0, max(frac, 1e-3)))}
    if arm == "truncate":
        return {"max_new_tokens": int(max(1, round(done["online"]["generated_per_rollout"])))}
    return {}


def matched_needs(task: str, pre: dict | None) -> dict[str, str]:
    """:data:`MATCHED` less what is known before any arm is trained: on the check task ``fixed_prefix`` is set
    from the precondition (which it then needs)."""
    needs = dict(MATCHED)
    if task == "check":
        if pre is None:
            raise ValueError("on the check task fixed_prefix is set by the precondition's kept fraction, which was "
                             "not measured (no precondition)")
        needs.pop("fixed_prefix")
    return needs


# Schedules per task. The models are tiny, so one torch thread is the fastest setting (thread synchronisation
# costs more than it saves, and much more on a busy machine). Measured times: docs/training.md.
SCHEDULES = {
    "arithmetic": {
        "full": dict(steps=200, prompts_per_step=16, num_samples=4, eval_size=200, eval_every=50, n_train=2000),
        "quick": dict(steps=60, prompts_per_step=8, num_samples=4, eval_size=200, eval_every=0, n_train=500),
    },
    # long task: lr 5e-4 (at 1e-3 and above the student's additions degrade within 20 steps, whatever the loss),
    # the forward KL (it teaches the additions about three times faster than the reverse KL) and a cosine decay
    # (at a constant lr the accuracy peaks mid-run and falls back): docs/training.md, "Why distillation did not
    # teach". The full schedule also trains online release and the sft baseline.
    "long": {
        "full": dict(steps=60, prompts_per_step=8, num_samples=4, eval_size=200, eval_every=20, n_train=2000,
                     precondition=256, lr=5e-4, loss="forward_kl", lr_scheduler="cosine",
                     arms=("full", "release", "online", "sft")),
        "quick": dict(steps=30, prompts_per_step=8, num_samples=4, eval_size=100, eval_every=15, n_train=500,
                      precondition=128, lr=5e-4, loss="forward_kl", lr_scheduler="cosine"),
    },
    # check task (fastopd.demo.check_task: the fade's position varies, a quarter of the problems have no check;
    # models in fastopd/assets/demo_check): the long task's recipe, and the place to see what reading the margins
    # does, so its demo sets the rule beside its matched controls (a fixed cut of the same mean kept fraction;
    # online beside a fixed budget of the same mean length) instead of the sft baseline.
    "check": {
        "full": dict(steps=60, prompts_per_step=8, num_samples=4, eval_size=400, eval_every=20, n_train=2000,
                     precondition=256, lr=5e-4, loss="forward_kl", lr_scheduler="cosine",
                     arms=("full", "release", "fixed_prefix", "online", "truncate")),
        "quick": dict(steps=30, prompts_per_step=8, num_samples=4, eval_size=100, eval_every=15, n_train=500,
                      precondition=128, lr=5e-4, loss="forward_kl", lr_scheduler="cosine",
                      arms=("full", "release", "fixed_prefix")),
    },
}
# Per task: the shipped prompt files (fastopd/assets/<assets>/data), the longest completion, the OOD task, the
# models' folder under fastopd/assets.
TASKS = {
    "long": dict(train="long_train.jsonl", eval="long_eval.jsonl", max_new_tokens=192, ood="arithmetic",
                 assets="demo"),
    "arithmetic": dict(train="train.jsonl", eval="eval.jsonl", max_new_tokens=72, ood="long", assets="demo"),
    "check": dict(train="check_train.jsonl", eval="check_eval.jsonl", max_new_tokens=192, ood="arithmetic",
                  assets="demo_check"),
}
# The exact dense divergence rather than the trainer's default `pg`: with a tiny student and a few minutes of CPU,
# its lower-variance gradient is what moves the student towards the teacher (see docs/training.md, "The demo");
# `fastopd demo --loss pg` runs the policy-gradient recipe instead. A schedule's own TRAIN_KEYS override these.
COMMON = dict(temperature=1.0, lr=5e-4, lr_scheduler="constant_with_warmup", warmup_steps=10,
              max_grad_norm=1.0, loss="reverse_kl", k=16, eval_batch_size=100, log_rollouts=True, save_every=0,
              keep_last=1)
DEFAULT_THREADS = 1
# The TrainConfig fields a schedule (SCHEDULES[task][kind]) may set over COMMON.
TRAIN_KEYS = ("lr", "loss", "lr_scheduler")


def demo_config(out_dir: Path, *, quick: bool, seed: int = 0, steps: int | None = None, progress: bool = True,
                num_threads: int = 0, task: str = "long", **overrides) -> tuple[TrainConfig, dict]:
    """The shared TrainConfig of both arms (mode and output_dir are set per arm) and the schedule used.

    The schedule dict also holds ``task``, ``ood_task`` and ``ood_eval`` (the OOD task's held-out prompt file).
    """
    from fastopd.demo.task import DEMO_VERIFIER, EVAL_SEED, TRAIN_SEED, demo_asset_paths, make_problems, write_jsonl

    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")

    paths = demo_asset_paths(TASKS[task]["assets"])
    build = "python scripts/build_demo_assets.py" + (" --task check" if task == "check" else "")
    missing = [str(paths[k]) for k in ("teacher", "student", "tokenizer") if not Path(paths[k]).exists()]
    if missing:
        raise FileNotFoundError(f"the demo models are missing ({', '.join(missing)}); "
                                f"rebuild them with `{build}`")
    sched = dict(SCHEDULES[task]["quick" if quick else "full"])
    if steps is not None:
        sched["steps"] = steps
    spec, ood = TASKS[task], TASKS[TASKS[task]["ood"]]
    shipped = Path(paths["root"]) / "data"  # the prompts shipped with the models (configs/demo_release.yaml)
    sched.update(task=task, ood_task=spec["ood"], ood_eval=str(shipped / ood["eval"]),
                 ood_max_new_tokens=ood["max_new_tokens"])
    if (shipped / spec["train"]).is_file() and (shipped / spec["eval"]).is_file():
        train_path, eval_path = shipped / spec["train"], shipped / spec["eval"]
    elif task != "arithmetic":
        raise FileNotFoundError(f"the {task} task's prompt files are missing in {shipped}; rebuild the demo assets "
                                f"with `{build}`")
    else:
        data = out_dir / "data"
        train_path = write_jsonl(data / "train.jsonl", make_problems(sched["n_train"], TRAIN_SEED, split="train"))
        eval_path = write_jsonl(data / "eval.jsonl", make_problems(sched["eval_size"], EVAL_SEED, split="eval"))
    cfg = TrainConfig(
        student=str(paths["student"]), teacher=str(paths["teacher"]), tokenizer=str(paths["tokenizer"]),
        train_data=str(train_path), eval_data=str(eval_path), verifier=DEMO_VERIFIER, seed=seed,
        steps=sched["steps"], prompts_per_step=sched["prompts_per_step"], num_samples=sched["num_samples"],
        eval_every=sched["eval_every"], eval_size=sched["eval_size"], eval_at_start=False,
        output_dir=str(out_dir), overwrite=True, progress=progress, num_threads=num_threads, log_with="none",
        max_new_tokens=spec["max_new_tokens"],
        **{**COMMON, **{k: sched[k] for k in TRAIN_KEYS if k in sched},
           **{k: v for k, v in overrides.items() if v is not None}})
    return cfg, sched


def baseline_accuracy(cfg: TrainConfig, sched: dict | None = None) -> dict:
    """Greedy accuracy of the teacher and of the initial student on the eval set (the trainer's evaluate).

    With a demo ``sched`` (:func:`demo_config`), also on the OOD task: ``out[role]["ood"]``.
    """
    from fastopd.train.models import load_model, load_tokenizer, quiet_transformers

    tok = load_tokenizer(cfg.tokenizer)
    out = {}
    with quiet_transformers():
        for role in ("teacher", "student"):
            model = load_model(getattr(cfg, role), dtype=torch.float32, attn="sdpa")
            t0 = time.perf_counter()
            res = eval_accuracy(model, tok, cfg.eval_data, cfg, cfg.max_new_tokens)
            res["time_s"] = time.perf_counter() - t0
            if sched is not None and Path(sched["ood_eval"]).is_file():
                res["ood"] = eval_accuracy(model, tok, sched["ood_eval"], cfg, sched["ood_max_new_tokens"])
                res["ood"]["nll"] = reference_nll(model, tok, sched["ood_task"], cfg.eval_size or 200)
            out[role] = res
            del model
    return out


def eval_accuracy(model, tok, rows_path, cfg: TrainConfig, max_new_tokens: int) -> dict:
    """Greedy accuracy of a loaded model on the first ``cfg.eval_size`` rows of a prompt file."""
    from fastopd.train.data import load_prompts
    from fastopd.train.rollouts import eos_ids_of, evaluate

    rows = load_prompts(str(rows_path))[:cfg.eval_size or None]
    return evaluate(model, tok, rows, verifier=cfg.verifier, eos_ids=eos_ids_of(tok, model),
                    max_new_tokens=max_new_tokens, batch_size=cfg.eval_batch_size)


def ood_metrics(model_dir, cfg: TrainConfig, sched: dict) -> dict:
    """OOD-task retention of a model folder (e.g. ``<run>/final``): greedy ``accuracy`` on the OOD task's
    held-out prompts, and ``nll``, the mean per-token negative log-likelihood of their reference solutions
    (+ EOS; :func:`reference_nll`), which still moves when the accuracy is near 0 or 1."""
    from fastopd.train.models import load_model, load_tokenizer, quiet_transformers

    tok = load_tokenizer(cfg.tokenizer)
    with quiet_transformers():
        model = load_model(str(model_dir), dtype=torch.float32, attn="sdpa")
        res = eval_accuracy(model, tok, sched["ood_eval"], cfg, sched["ood_max_new_tokens"])
        nll = reference_nll(model, tok, sched["ood_task"], cfg.eval_size or 200)
    return {"accuracy": res["accuracy"], "nll": nll}


@torch.no_grad()
def reference_nll(model, tok, task: str, n: int, batch_size: int = 50) -> float:
    """Mean per-token NLL (nats) of the reference solutions + EOS of ``task``'s first ``n`` held-out problems
    (the problems of the shipped eval files, regenerated with their seed), given ``format_prompt``."""
    import torch.nn.functional as F

    from fastopd.demo import check_task, long_task, task as arith
    from fastopd.demo.task import format_prompt, solution_completion

    module = {"long": long_task, "check": check_task}.get(task, arith)
    problems = module.make_problems(n, module.EVAL_SEED, split="eval")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(problems), batch_size):
        rows = []
        for p in problems[i:i + batch_size]:
            a = tok(format_prompt(p["prompt"]))["input_ids"]
            b = tok(solution_completion(p))["input_ids"] + [tok.eos_token_id]
            rows.append((a + b, [-100] * len(a) + b))
        width = max(len(x) for x, _ in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (x, y) in enumerate(rows):
            ids[j, :len(x)], lab[j, :len(y)], att[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        tgt = lab[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((tgt != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def run_precondition(cfg: TrainConfig, sched: dict, out_dir: Path, progress: bool = True) -> dict:
    """:func:`fastopd.demo.precondition.measure_precondition` on ``sched["precondition"]`` rollouts of the
    initial student over the training prompts (records in ``out_dir``)."""
    from fastopd.train.data import load_prompts
    from fastopd.demo.precondition import measure_precondition
    from fastopd.train.models import load_model, load_tokenizer, quiet_transformers

    rows = load_prompts(cfg.train_data)
    tok = load_tokenizer(cfg.tokenizer)
    with quiet_transformers():
        student = load_model(cfg.student, dtype=torch.float32, attn="sdpa")
        teacher = load_model(cfg.teacher, dtype=torch.float32, attn="sdpa")
    return measure_precondition(student, teacher, tok, [r["prompt"] for r in rows], answers=[r["answer"] for r in rows],
                                n_rollouts=sched.get("precondition", 256), max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, k=cfg.k, min_segments=cfg.min_segments,
                                min_gain=cfg.min_gain, seed=cfg.seed, verifier=cfg.verifier, out_dir=out_dir,
                                progress=progress)


def phase_shares(metrics: list[dict]) -> dict:
    """Mean seconds per step of each logged phase and its share of the step (``time_step``)."""
    from fastopd.train.trainer import PHASES

    out = {}
    total = sum(r.get("time_step", 0.0) for r in metrics)
    for key in ("time_generate",) + PHASES:
        vals = [r[key] for r in metrics if key in r]
        if vals:
            out[key] = sum(vals) / len(vals)
            out[key.replace("time_", "share_")] = sum(vals) / total if total > 0 else float("nan")
    return out


def arm_summary(summary: dict, run: dict, run_dir: Path) -> dict:
    """The numbers the table reports for one arm, from the trainer's summary and the run's logs."""
    from fastopd.common import release_means, release_sums
    import math

    from fastopd.train.report import release_fraction
    from fastopd.train.runlog import as_float

    rollouts, metrics = run["rollouts"], run["metrics"]
    n_valid = sum(r["length"] for r in rollouts)
    n_kept = sum(round(as_float(r["kept_fraction"]) * r["length"]) for r in rollouts
                 if math.isfinite(as_float(r["kept_fraction"])))
    rule = release_means(release_sums([as_float(r["gain"]) for r in rollouts], [r["accepted"] for r in rollouts],
                                      [release_fraction(r) for r in rollouts], n_valid, n_kept))
    if not rollouts:  # no rule decisions logged (the sft baseline): no rule metrics, not zeros
        rule = dict.fromkeys(("accept_rate", "release_position", "gain_mean", "kept_fraction"), float("nan"))
    window = max(1, min(10, len(metrics) // 4))
    mean = lambda rows, key: sum(as_float(r[key]) for r in rows) / len(rows)  # noqa: E731
    generated = int(sum(as_float(r.get("tokens_generated")) for r in metrics if "tokens_generated" in r))
    return {
        "accuracy_after": summary["eval"]["accuracy"],
        "eval_curve": [(e["step"], e["accuracy"]) for e in run["eval"]],
        "tokens": summary["tokens"],
        "tokens_supervised": summary["tokens_supervised"],
        "supervised_fraction": summary["tokens_supervised"] / max(summary["tokens"], 1),
        "time_per_step": summary["time_per_step"],
        "accept_rate": rule["accept_rate"],
        "release_position": rule["release_position"],
        "gain_mean": rule["gain_mean"],
        "kept_fraction": rule["kept_fraction"],  # kept / valid tokens over the arm's logged rollouts
        **phase_shares(metrics),
        # -mean A_t = the sampled-token estimate of the reverse KL(student || teacher) on the student's rollouts
        "kl_first": -mean(metrics[:window], "adv_mean"),
        "kl_last": -mean(metrics[-window:], "adv_mean"),
        "kl_window": window,
        "tokens_generated": generated,
        "teacher_tokens": int(sum(as_float(r.get("teacher_tokens")) for r in metrics if "teacher_tokens" in r)),
        "generated_per_rollout": generated / max(sum(r.get("rollouts", 0) for r in metrics), 1),
        "sample_accuracy_first": mean(metrics[:window], "sample_accuracy"),
        "sample_accuracy_last": mean(metrics[-window:], "sample_accuracy"),
        "run_dir": str(run_dir),
    }


def online_saving(online: dict, full: dict) -> str:
    """One line: what online release saved against the full arm of the same seed (docs/formulas.md §8)."""
    def ratio(key):
        a, b = online.get(key), full.get(key)
        return f"{a / b:.2f}x" if a and b else "-"

    return (f"Online release against full OPD (same seed): time per step {ratio('time_per_step')}, tokens generated "
            f"{ratio('tokens_generated')} ({online.get('tokens_generated', 0):,} vs {full.get('tokens_generated', 0):,}), "
            f"teacher tokens scored {ratio('teacher_tokens')}, tokens supervised {ratio('tokens_supervised')}; "
            f"accuracy {online['accuracy_after']:.1%} vs {full['accuracy_after']:.1%}.")


def matched_lines(table: dict) -> list[str]:
    """What each matched control was set to and how the rule's arm compares with it (same seed): the table's
    answer to "why read the margins rather than cut at a fixed place?" (one seed: the study gives the intervals)."""
    arms, out = table["arms"], []
    for arm, control in (("release", "fixed_prefix"), ("online", "truncate")):
        if arm not in arms or control not in arms:
            continue
        a, c = arms[arm], arms[control]
        how = (f"which keeps the first {c['fraction']:.0%} of every rollout's tokens (the rule's mean kept fraction"
               + (", measured in the precondition)" if table.get("task") == "check" else " in the release arm)")
               if control == "fixed_prefix" else
               f"which stops every rollout at {c['max_new_tokens']} tokens (the online arm's mean generated length, "
               f"{a['generated_per_rollout']:.1f})")
        ratio = a["time_per_step"] / c["time_per_step"] if c["time_per_step"] else float("nan")
        out += [f"{arm} against its matched control, {control}, {how}: accuracy {a['accuracy_after']:.1%} vs "
                f"{c['accuracy_after']:.1%} ({100 * (a['accuracy_after'] - c['accuracy_after']):+.1f} points), tokens "
                f"supervised {a['tokens_supervised']:,} vs {c['tokens_supervised']:,}, tokens generated "
                f"{a.get('tokens_generated') or a['tokens']:,} vs {c.get('tokens_generated') or c['tokens']:,}, time per "
                f"step {a['time_per_step']:.2f} s vs {c['time_per_step']:.2f} s ({ratio:.2f}x).", ""]
    return out


def _supervised_of_generated(a: dict) -> str:
    """``"129,749 of 235,650 (55%)"``: tokens supervised of the tokens the sampler generated (for online release
    also those generated past a stop and cut; the rollouts' own tokens follow in brackets when they differ)."""
    gen = a.get("tokens_generated") or a["tokens"]
    kept = f"; {a['tokens']:,} in the rollouts" if a["tokens"] != gen else ""
    return f"{a['tokens_supervised']:,} of {gen:,} ({a['tokens_supervised'] / max(gen, 1):.0%}{kept})"


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{v:.1%}"


def format_table(table: dict) -> str:
    """The demo's table as markdown."""
    n = table["eval_problems"]
    task = table.get("task", "arithmetic")
    ood = table.get("ood_task")
    ood_col = f" | OOD accuracy ({ood} task)" if ood else ""
    lines = [
        f"| model | accuracy ({n} held-out {task} problems, greedy) | curve (step: accuracy){ood_col} | "
        "KL(student, teacher) on rollouts, first -> last steps | accept rate | mean gain | kept fraction "
        "(of the rollouts' tokens) | tokens supervised of tokens generated | time / step |",
        "|---|---|---|" + ("---|" if ood else "") + "---|---|---|---|---|---|",
        f"| teacher | {table['teacher_accuracy']:.1%} | -" + (f" | {_pct(table.get('teacher_ood_accuracy'))}" if ood else "")
        + " | - | - | - | - | - | - |",
        f"| student before | {table['student_accuracy_before']:.1%} | -"
        + (f" | {_pct(table.get('student_ood_accuracy_before'))}" if ood else "") + " | - | - | - | - | - | - |",
    ]
    for arm, label in ARMS:
        if arm not in table["arms"]:
            continue
        a = table["arms"][arm]
        gain = a.get("gain_mean", float("nan"))
        curve = ", ".join(f"{step}: {acc:.0%}" for step, acc in a.get("eval_curve", []))
        kl = "-" if a["kl_first"] != a["kl_first"] else f"{a['kl_first']:.3f} -> {a['kl_last']:.3f}"
        lines.append(f"| student after {label} | {a['accuracy_after']:.1%} | {curve}"
                     + (f" | {_pct(a.get('ood_accuracy_after'))}" if ood else "")
                     + f" | {kl} | {_pct(a['accept_rate'])} | "
                     + ("-" if gain != gain else f"{gain:.1f}") + f" | {_pct(a.get('kept_fraction'))} | "
                     + _supervised_of_generated(a) + f" | {a['time_per_step']:.2f} s |")
    rel = table["arms"]["release"]
    lines += [""]
    if "online" in table["arms"]:
        lines += ["Online release's accept rate, mean gain and kept fraction are those of rollouts that already stopped "
                  "at their release (the scan reads the segments generated up to the stop, so the gain is smaller and "
                  "most of each rollout is kept); its tokens supervised of tokens generated is the figure to compare "
                  "with the release arm's.", ""]
    if table.get("student_ood_nll_before") is not None and "ood_nll_after" in rel:
        lines += [f"OOD retention, mean NLL of the {ood} task's reference solutions (nats/token, lower is better): "
                  f"student before {table['student_ood_nll_before']:.4f}, after " + ", ".join(
                      f"{arm} {table['arms'][arm]['ood_nll_after']:.4f}" for arm, _ in ARMS if arm in table["arms"])
                  + ".", ""]
    if "online" in table["arms"] and "full" in table["arms"]:
        lines += [online_saving(table["arms"]["online"], table["arms"]["full"]), ""]
    lines += matched_lines(table)
    if table.get("precondition"):
        from fastopd.demo.precondition import format_precondition

        lines += [format_precondition(table["precondition"]), ""]
    if "share_rule" in rel:
        lines += [
            "Time per step of the release arm: " + ", ".join(
                f"{k[5:]} {rel[k]:.3f} s ({rel['share_' + k[5:]]:.1%})" for k in (
                    "time_generate", "time_teacher", "time_student_forward", "time_rule", "time_backward",
                    "time_optimizer") if k in rel)
            + f". The rule (segments + means + scan + weights) takes {rel['share_rule']:.1%} of a step "
            "(goal <= 3%).", ""]
    lines += [
        f"Release arm: accept rate {rel['accept_rate']:.1%} of rollouts, mean release position "
        f"{rel['release_position']:.2f} of the response (accepted rollouts). Every arm: {table['steps']} steps x "
        f"{table['rollouts_per_step']} rollouts, loss {table.get('loss', '?')}, lr {table.get('lr', float('nan')):g} "
        f"({table.get('lr_scheduler', '?')}), "
        f"seed {table['seed']}. KL = -mean A_t (sampled-token estimate), mean of the first / last "
        f"{rel.get('kl_window', '?')} steps. Total demo time {table['total_time_s']:.0f} s.",
    ]
    return "\n".join(lines)


def default_jobs() -> int:
    """Arms trained at once by default: one per CPU core available to this process, at most 3."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(3, cores))


def _call_with_threads(args):
    fn, threads, item = args
    torch.set_num_threads(threads)
    return fn(*item)


def in_processes(fn, items: list[tuple], *, jobs: int, threads: int, before=None, after=None,
                 desc: str | None = None) -> list:
    """``fn(*item)`` for every item, in order. ``jobs`` > 1 runs that many at once, each in its own spawned
    process with ``threads`` torch threads (``fn`` must be importable); otherwise one after the other here.
    ``before(i)`` is called as item i starts (one at a time only), ``after(i, result)`` as it finishes; ``desc``
    shows a progress bar over the finished items when they run at once. Returns the results in order."""
    out = []
    if jobs <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            if before is not None:
                before(i)
            out.append(fn(*item))
            if after is not None:
                after(i, out[-1])
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_call_with_threads, (fn, threads, item)) for item in items]
        for i, fut in enumerate(tqdm(futures, desc=desc, disable=desc is None)):
            out.append(fut.result())
            if after is not None:
                after(i, out[-1])
    return out


def train_arms(cfgs: list[TrainConfig], *, jobs: int = 1, labels: list[str] | None = None) -> list[dict]:
    """``fastopd.train.trainer.train`` on each config (:func:`in_processes`: ``jobs`` at once, each with the
    configs' torch threads). Returns the summaries in the order of ``cfgs``."""
    from fastopd.train.trainer import train

    labels = labels or [c.label for c in cfgs]

    def done(i, summary):
        if jobs > 1:
            acc = (summary.get("eval") or {}).get("accuracy")
            print(f"--- {labels[i]}: done, accuracy {_pct(acc)}, {summary['time_per_step']:.2f} s/step", flush=True)

    threads = (cfgs[0].num_threads if cfgs else 0) or DEFAULT_THREADS
    return in_processes(train, [(cfg,) for cfg in cfgs], jobs=jobs, threads=threads,
                        before=lambda i: print(f"--- {labels[i]}", flush=True), after=done)


def plot_accuracy(table: dict, path: Path) -> Path:
    """Greedy held-out accuracy of every arm over its eval points, the starting student and the teacher."""
    from fastopd.train.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for arm, label in ARMS:
        if arm in table["arms"]:
            steps, acc = zip(*table["arms"][arm]["eval_curve"])
            ax.plot(steps, [100 * a for a in acc], "o-", label=label)
    ax.axhline(100 * table["student_accuracy_before"], color="gray", ls="--", lw=1, label="student before")
    ax.axhline(100 * table["teacher_accuracy"], color="black", ls=":", lw=1, label="teacher")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"greedy accuracy, {table['eval_problems']} held-out problems (%)")
    ax.set_title(f"Greedy held-out accuracy of each arm over training\n(fastopd demo, {table.get('task', '?')} task, "
                 f"seed {table['seed']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)  # off the data
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: str | Path = "fastopd-demo", *, quick: bool = False, seed: int = 0, steps: int | None = None,
             progress: bool = True, num_threads: int = 0, loss: str | None = None, lr: float | None = None,
             task: str = "long", jobs: int = 0) -> dict:
    """Run the demo, write ``out_dir/{table.md,table.json,*.png}`` and return the table as a dict.

    ``steps``, ``loss`` and ``lr`` override the schedule's values (every arm). ``jobs``: arms trained at once,
    one process each (0: :func:`default_jobs`, one per core).
    """
    from fastopd.train.report import load_run, make_report, plot_training_curves

    t_start = time.perf_counter()
    # the settings a user gives are checked before any folder is made or any model is loaded
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        raise ValueError(f"jobs must be an int >= 0 (0: one per core), got {jobs!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_threads = num_threads or DEFAULT_THREADS
    torch.set_num_threads(num_threads)
    cfg, sched = demo_config(out_dir, quick=quick, seed=seed, steps=steps, progress=progress,
                             num_threads=num_threads, loss=loss, lr=lr, task=task)
    print(f"fastopd demo ({'quick' if quick else 'full'}, {task} task): {sched['steps']} steps x "
          f"{sched['prompts_per_step'] * sched['num_samples']} rollouts per arm, {sched['eval_size']} eval problems, "
          f"{torch.get_num_threads()} CPU threads -> {out_dir}", flush=True)
    base = baseline_accuracy(cfg, sched)
    ood_of = lambda role: base[role].get("ood", {}).get("accuracy")  # noqa: E731
    print(f"teacher accuracy {base['teacher']['accuracy']:.1%}, student accuracy {base['student']['accuracy']:.1%} "
          f"(greedy, {base['student']['total']} {task} problems); OOD ({sched['ood_task']} task): teacher "
          f"{_pct(ood_of('teacher'))}, student {_pct(ood_of('student'))}", flush=True)
    pre = None
    if sched.get("precondition"):  # its paragraph is printed once, with the table (format_table)
        pre = run_precondition(cfg, sched, out_dir / "precondition", progress=progress)

    arms = {}
    start = (0, base["student"]["accuracy"])
    labels = dict(ARMS)
    todo = [(arm, labels[arm]) for arm in schedule_arms(sched)]
    # a matched control is set from another arm's result (matched_needs): such arms are trained second
    needs = matched_needs(task, pre)
    phases = [[t for t in todo if t[0] not in needs], [t for t in todo if t[0] in needs]]
    jobs = max(1, min(jobs or default_jobs(), max(len(p) for p in phases)))
    if jobs > 1:
        print(f"--- {len(todo)} arms ({', '.join(a for a, _ in todo)}), {jobs} at a time (one process each)",
              flush=True)
    for phase in phases:
        if not phase:
            continue
        matched = {arm: matched_fields(arm, task, pre, arms) for arm, _ in phase}
        cfgs = [dataclasses.replace(cfg, **ARM_FIELDS[arm], **matched[arm], output_dir=str(out_dir / arm),
                                    progress=progress and jobs == 1) for arm, _ in phase]
        summaries = train_arms(cfgs, jobs=jobs, labels=[label for _, label in phase])
        for (arm, label), summary in zip(phase, summaries):
            run = load_run(out_dir / arm)
            arms[arm] = arm_summary(summary, run, out_dir / arm) | matched[arm]
            arms[arm]["eval_curve"] = [start] + arms[arm]["eval_curve"]
            if Path(sched["ood_eval"]).is_file():
                ood = ood_metrics(out_dir / arm / "final", cfg, sched)
                arms[arm]["ood_accuracy_after"], arms[arm]["ood_nll_after"] = ood["accuracy"], ood["nll"]
    table = {
        "task": task, "ood_task": sched["ood_task"],
        "teacher_ood_accuracy": ood_of("teacher"), "student_ood_accuracy_before": ood_of("student"),
        "student_ood_nll_before": base["student"].get("ood", {}).get("nll"),
        "precondition": pre,
        "quick": quick, "seed": seed, "steps": sched["steps"], "loss": cfg.loss, "lr": cfg.lr, "lr_scheduler": cfg.lr_scheduler,
        "rollouts_per_step": sched["prompts_per_step"] * sched["num_samples"],
        "eval_problems": base["student"]["total"],
        "teacher_accuracy": base["teacher"]["accuracy"],
        "student_accuracy_before": base["student"]["accuracy"],
        "arms": arms,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    runs = {label: out_dir / arm for arm, label in (("full", "full"), ("release", "release rule"))}
    if pre is not None:
        runs = {"before OPD (precondition)": out_dir / "precondition", **runs}
    figures = make_report(runs, out_dir, min_gain=cfg.min_gain, k=cfg.k)
    # the training curves of every arm the demo trained (make_report drew those of the rule's two)
    plot_training_curves({label: load_run(out_dir / arm) for arm, label in todo}, out_dir / "training_curves.png")
    figures.append(plot_accuracy(table, out_dir / "accuracy.png"))
    table["figures"] = [str(p) for p in figures]
    table["total_time_s"] = time.perf_counter() - t_start
    md = format_table(table)
    (out_dir / "table.md").write_text(md + "\n")
    (out_dir / "table.json").write_text(json.dumps(table, indent=1, default=str) + "\n")
    print("\n" + md + f"\n\nReport: {out_dir.resolve()} (table.md, table.json, " +
          ", ".join(Path(p).name for p in figures) + ")", flush=True)
    return table
