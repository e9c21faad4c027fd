"""``fastopd demo``: on-policy distillation with and without the release rule, on a CPU, in minutes.

Uses the shipped tiny Qwen3 teacher and student (``fastopd/assets/demo``, built by
``scripts/build_demo_assets.py``) on the synthetic multi-step arithmetic task (``fastopd.train.task``):

1. greedy accuracy of the teacher and of the student on held-out problems;
2. two OPD runs from the same student, the same prompts and the same seed: the ``full`` control (every
   token supervised) and the release rule (``release``: prefix kept, suffix released);
3. a table (teacher; student before; after full OPD; after release-rule OPD; tokens supervised; time per
   step), written as ``table.md`` / ``table.json``, and the figures of :mod:`fastopd.train.report`.

Nothing is downloaded. ``--quick`` runs a shorter schedule (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from fastopd.train.config import TrainConfig

ARMS = (("full", "full OPD (every token)"), ("release", "release-rule OPD (prefix only)"))

# Schedules. Sizes were chosen so that the full demo fits in 10 minutes and --quick in 2 minutes on a
# 2-core CPU (measured times in docs/training.md). The models are tiny, so one torch thread is the fastest
# setting (thread synchronisation costs more than it saves, and much more on a busy machine).
SCHEDULES = {
    "full": dict(steps=200, prompts_per_step=16, num_samples=4, eval_size=200, eval_every=50, n_train=2000),
    "quick": dict(steps=60, prompts_per_step=8, num_samples=4, eval_size=200, eval_every=0, n_train=500),
}
# The exact dense reverse KL (`loss="reverse_kl"`) rather than the trainer's default `pg`: with a 156k-parameter
# student and a few minutes of CPU, its lower-variance gradient is what moves the student towards the teacher
# (see docs/training.md, "The demo"); `fastopd demo --loss pg` runs the policy-gradient recipe instead.
COMMON = dict(max_new_tokens=72, temperature=1.0, lr=5e-4, lr_scheduler="constant_with_warmup", warmup_steps=10,
              max_grad_norm=1.0, loss="reverse_kl", k=16, eval_batch_size=100, log_rollouts=True, save_every=0,
              keep_last=1)
DEFAULT_THREADS = 1


def demo_config(out_dir: Path, *, quick: bool, seed: int = 0, steps: int | None = None, progress: bool = True,
                num_threads: int = 0, **overrides) -> tuple[TrainConfig, dict]:
    """The shared TrainConfig of both arms (mode and output_dir are set per arm) and the schedule used."""
    from fastopd.train.task import DEMO_VERIFIER, EVAL_SEED, TRAIN_SEED, demo_asset_paths, make_problems, write_jsonl

    paths = demo_asset_paths()
    missing = [str(paths[k]) for k in ("teacher", "student", "tokenizer") if not Path(paths[k]).exists()]
    if missing:
        raise FileNotFoundError(f"the demo models are missing ({', '.join(missing)}); "
                                "rebuild them with `python scripts/build_demo_assets.py`")
    sched = dict(SCHEDULES["quick" if quick else "full"])
    if steps is not None:
        sched["steps"] = steps
    shipped = Path(paths["root"]) / "data"  # the prompts shipped with the models (configs/demo_release.yaml)
    if (shipped / "train.jsonl").is_file() and (shipped / "eval.jsonl").is_file():
        train_path, eval_path = shipped / "train.jsonl", shipped / "eval.jsonl"
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
        **{**COMMON, **{k: v for k, v in overrides.items() if v is not None}})
    return cfg, sched


def baseline_accuracy(cfg: TrainConfig) -> dict:
    """Greedy accuracy of the teacher and of the initial student on the eval set (the trainer's evaluate)."""
    from fastopd.train.data import load_prompts
    from fastopd.train.trainer import eos_ids_of, evaluate, load_model, load_tokenizer, quiet_transformers

    rows = load_prompts(cfg.eval_data)[:cfg.eval_size or None]
    tok = load_tokenizer(cfg.tokenizer)
    out = {}
    with quiet_transformers():
        for role in ("teacher", "student"):
            model = load_model(getattr(cfg, role), dtype=torch.float32, attn="sdpa")
            t0 = time.perf_counter()
            res = evaluate(model, tok, rows, verifier=cfg.verifier, eos_ids=eos_ids_of(tok, model),
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
            res["time_s"] = time.perf_counter() - t0
            out[role] = res
            del model
    return out


def arm_summary(summary: dict, run: dict, run_dir: Path) -> dict:
    """The numbers the table reports for one arm, from the trainer's summary and the run's logs."""
    from fastopd.common import release_means, release_sums
    from fastopd.train.report import release_fraction

    rollouts, metrics = run["rollouts"], run["metrics"]
    rule = release_means(release_sums([r["gain"] for r in rollouts], [r["accepted"] for r in rollouts],
                                      [release_fraction(r) for r in rollouts], 0, 0))
    window = max(1, min(10, len(metrics) // 4))
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {
        "accuracy_after": summary["eval"]["accuracy"],
        "eval_curve": [(e["step"], e["accuracy"]) for e in run["eval"]],
        "tokens": summary["tokens"],
        "tokens_supervised": summary["tokens_supervised"],
        "supervised_fraction": summary["tokens_supervised"] / max(summary["tokens"], 1),
        "time_per_step": summary["time_per_step"],
        "accept_rate": rule["accept_rate"],
        "release_position": rule["release_position"],
        # -mean A_t = the sampled-token estimate of the reverse KL(student || teacher) on the student's rollouts
        "kl_first": -mean(metrics[:window], "adv_mean"),
        "kl_last": -mean(metrics[-window:], "adv_mean"),
        "kl_window": window,
        "sample_accuracy_first": mean(metrics[:window], "sample_accuracy"),
        "sample_accuracy_last": mean(metrics[-window:], "sample_accuracy"),
        "run_dir": str(run_dir),
    }


def format_table(table: dict) -> str:
    """The demo's table as markdown."""
    n = table["eval_problems"]
    lines = [
        f"| model | accuracy ({n} held-out problems, greedy) | KL(student, teacher) on rollouts, first -> last "
        "steps | tokens supervised | time / step |",
        "|---|---|---|---|---|",
        f"| teacher | {table['teacher_accuracy']:.1%} | - | - | - |",
        f"| student before OPD | {table['student_accuracy_before']:.1%} | - | - | - |",
    ]
    for arm, label in ARMS:
        a = table["arms"][arm]
        lines.append(f"| student after {label} | {a['accuracy_after']:.1%} | {a['kl_first']:.3f} -> {a['kl_last']:.3f} | "
                     f"{a['tokens_supervised']:,} of {a['tokens']:,} ({a['supervised_fraction']:.0%}) | "
                     f"{a['time_per_step']:.2f} s |")
    rel = table["arms"]["release"]
    lines += [
        "",
        f"Release arm: accept rate {rel['accept_rate']:.1%} of rollouts, mean release position "
        f"{rel['release_position']:.2f} of the response (accepted rollouts). Both arms: {table['steps']} steps x "
        f"{table['rollouts_per_step']} rollouts, loss {table.get('loss', '?')}, lr {table.get('lr', float('nan')):g}, "
        f"seed {table['seed']}. KL = -mean A_t (sampled-token estimate), mean of the first / last "
        f"{rel.get('kl_window', '?')} steps. Total demo time {table['total_time_s']:.0f} s.",
    ]
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "fastopd-demo", *, quick: bool = False, seed: int = 0, steps: int | None = None,
             progress: bool = True, num_threads: int = 0, loss: str | None = None, lr: float | None = None) -> dict:
    """Run the demo, write ``out_dir/{table.md,table.json,*.png}`` and return the table as a dict.

    ``steps``, ``loss`` and ``lr`` override the schedule's values (both arms).
    """
    from fastopd.train.report import load_run, make_report
    from fastopd.train.trainer import train

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_threads = num_threads or DEFAULT_THREADS
    torch.set_num_threads(num_threads)
    cfg, sched = demo_config(out_dir, quick=quick, seed=seed, steps=steps, progress=progress,
                             num_threads=num_threads, loss=loss, lr=lr)
    print(f"fastopd demo ({'quick' if quick else 'full'}): {sched['steps']} steps x "
          f"{sched['prompts_per_step'] * sched['num_samples']} rollouts per arm, {sched['eval_size']} eval problems, "
          f"{torch.get_num_threads()} CPU threads -> {out_dir}", flush=True)
    base = baseline_accuracy(cfg)
    print(f"teacher accuracy {base['teacher']['accuracy']:.1%}, student accuracy {base['student']['accuracy']:.1%} "
          f"(greedy, {base['student']['total']} problems)", flush=True)

    arms = {}
    for arm, label in ARMS:
        print(f"--- {label}", flush=True)
        summary = train(dataclasses.replace(cfg, mode=arm, output_dir=str(out_dir / arm)))
        run = load_run(out_dir / arm)
        arms[arm] = arm_summary(summary, run, out_dir / arm)
    table = {
        "quick": quick, "seed": seed, "steps": sched["steps"], "loss": cfg.loss, "lr": cfg.lr,
        "rollouts_per_step": sched["prompts_per_step"] * sched["num_samples"],
        "eval_problems": base["student"]["total"],
        "teacher_accuracy": base["teacher"]["accuracy"],
        "student_accuracy_before": base["student"]["accuracy"],
        "arms": arms,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    figures = make_report({label: out_dir / arm for arm, label in
                           (("full", "full"), ("release", "release rule"))}, out_dir, min_gain=cfg.min_gain)
    table["figures"] = [str(p) for p in figures]
    table["total_time_s"] = time.perf_counter() - t_start
    md = format_table(table)
    (out_dir / "table.md").write_text(md + "\n")
    (out_dir / "table.json").write_text(json.dumps(table, indent=1, default=str) + "\n")
    print("\n" + md + f"\n\nReport: {out_dir.resolve()} (table.md, table.json, " +
          ", ".join(Path(p).name for p in figures) + ")", flush=True)
    return table
