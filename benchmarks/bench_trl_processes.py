"""The TRL adapter's cost as a user sees it: each trainer in its own process, training steps interleaved (CPU).

``benchmarks/bench_trl_adapter.py`` times the loss call of TRL's ``DistillationTrainer`` and fastopd's
``ReleaseDistillationTrainer`` round-robin in one process, on one batch. A user runs one trainer per process,
with its own allocator, thread pool and first-call warm-up, on its own rollouts. This benchmark does that: one
worker process per method (``trl``: TRL's own trainer, beta=1; ``full`` / ``release``: the adapter with
``opd_loss="reverse_kl"``), each calling ``trainer.train()`` on the demo's long task (the shipped tiny models,
``--batch`` prompts of ``long_train.jsonl`` per step, up to ``--completion`` tokens, the same seed, so the same
completions), with a ``TrainerCallback`` that holds every step until the coordinator says go. The coordinator
lets the workers take their steps in turn (step s of every worker, rotated, before step s+1), so a load spike of
the shared machine falls on all alike -- separate runs at different times measure the load, not the code.

Per step and worker: the forward of the loss call (the trainer's ``_compute_loss``: both models' forwards, the
loss; fastopd's ``opd_mode="full"`` computes the loss's gradient here, in the same chunk pass, where TRL does it
in the backward), the backward (``accelerator.backward``), their sum (the loss call as the round-robin benchmark
times it), and TRL's own logged ``step_time`` (the whole step with generation). Prints medians over the steps after
``--warmup`` and the per-step paired ratios to ``trl`` (their medians; per completion token, which is the same
ratio when the rollouts are the same -- they are for ``full``; ``release`` draws other rollouts).

Usage::

    python benchmarks/bench_trl_processes.py --steps 8 --rounds 2 --json benchmarks/results/trl_processes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

METHODS = ("trl", "full", "release")


def worker(args) -> None:
    """One trainer; reads 'go' before each step, writes one JSON line per step to stdout (fd 3 kept clean)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # the trainer's prints go to stderr; fd 1 carries our lines only
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import tempfile

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fastopd.demo.task import demo_asset_paths, read_jsonl
    from fastopd.integrations.trl import (
        ReleaseDistillationConfig,
        ReleaseDistillationTrainer,
    )

    paths = demo_asset_paths()
    tok = AutoTokenizer.from_pretrained(paths.tokenizer, padding_side="left")
    prompts = [r["prompt"] for r in read_jsonl(paths.root / "data" / "long_train.jsonl")][:args.batch * args.steps]
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_pretrained(paths.student)
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher)
    base = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, per_device_train_batch_size=args.batch,
                max_steps=args.steps, max_completion_length=args.completion, learning_rate=5e-4, logging_steps=1,
                report_to=[], save_strategy="no", seed=args.seed, beta=1.0, temperature=1.0)
    data = Dataset.from_dict({"prompt": prompts})
    if args.worker == "trl":
        tr = trl.DistillationTrainer(model=student, teacher_model=teacher, args=trl.DistillationConfig(**base),
                                     train_dataset=data, processing_class=tok)
    else:
        tr = ReleaseDistillationTrainer(model=student, teacher_model=teacher, train_dataset=data, processing_class=tok,
                                        args=ReleaseDistillationConfig(**base, opd_mode=args.worker,
                                                                       opd_loss="reverse_kl"))
    rec: dict = {}
    compute = tr._compute_loss

    def timed_loss(unwrapped, inputs, n):
        t0 = time.perf_counter()
        r = compute(unwrapped, inputs, n)
        rec.update(forward_s=time.perf_counter() - t0, tokens=int(inputs["completion_mask"].sum()))
        return r

    backward = tr.accelerator.backward

    def timed_backward(loss, **kw):
        t0 = time.perf_counter()
        r = backward(loss, **kw)
        rec["backward_s"] = time.perf_counter() - t0
        return r

    tr._compute_loss, tr.accelerator.backward = timed_loss, timed_backward

    class Gate(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(0)

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "step_time" in logs:
                rec["step_time"] = logs["step_time"]
                out.write(json.dumps(rec) + "\n")
                rec.clear()

    tr.add_callback(Gate())
    tr.train()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="trl,full,release")
    ap.add_argument("--steps", type=int, default=8, help="training steps per worker and round")
    ap.add_argument("--rounds", type=int, default=2, help="fresh workers per method, one after another")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each worker left out of the medians")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default, as a user)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    methods = args.methods.split(",")
    load0 = os.getloadavg()
    rows = {m: [] for m in methods}
    for rnd in range(args.rounds):
        procs = {}
        for m in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", m] + [
                f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "completion", "threads", "seed")]
            procs[m] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, bufsize=1)
        for step in range(args.steps):
            order = methods[(step + rnd) % len(methods):] + methods[:(step + rnd) % len(methods)]
            for m in order:
                p = procs[m]
                p.stdin.write("go\n")
                p.stdin.flush()
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker {m} ended early (rerun it alone to see its error)")
                r = json.loads(line)
                r.update(round=rnd, step=step, loss_call_s=r["forward_s"] + r["backward_s"])
                rows[m].append(r)
        for p in procs.values():
            p.stdin.close()
            p.wait()
    keys = ("forward_s", "backward_s", "loss_call_s", "step_time")
    kept = {m: [r for r in rows[m] if r["step"] >= args.warmup] for m in methods}
    summary = {m: {k: statistics.median(r[k] for r in kept[m]) for k in keys} for m in methods}
    ratios = {}
    if "trl" in methods:
        for m in methods:
            if m == "trl":
                continue
            # the same seed gives the same completions, unless the method draws from the global RNG (then the
            # ratios are per completion token, and the table says so)
            same = all(a["tokens"] == b["tokens"] for a, b in zip(kept[m], kept["trl"]))
            ratios[m] = {k: statistics.median((a[k] / a["tokens"]) / (b[k] / b["tokens"])
                                              for a, b in zip(kept[m], kept["trl"])) for k in keys}
            ratios[m]["same_rollouts"] = same
    load1 = os.getloadavg()
    lines = [(f"Each trainer in its own process, steps interleaved; {args.rounds} round(s) x {args.steps} steps "
              f"(medians after {args.warmup} warm-up step(s) per worker), batch {args.batch} x up to "
              f"{args.completion} tokens, threads {'torch default' if not args.threads else args.threads}; load "
              f"average before/after {load0[0]:.1f} / {load1[0]:.1f}; {platform.machine()}, {os.cpu_count()} CPUs"),
             "",
             ("| method | forward (s) | backward (s) | loss call = forward + backward (s) | TRL step_time (s) | "
              "ratio to trl: forward / backward / loss call / step_time |"), "|---|---:|---:|---:|---:|---|"]
    for m in methods:
        s = summary[m]
        rr = ratios.get(m)
        rtxt = (" / ".join(f"{rr[k]:.3f}" for k in keys) + ("" if rr["same_rollouts"] else " (per token: other "
                "rollouts than trl's)")) if rr else "1"
        lines.append(f"| {m} | {s['forward_s']:.3f} | {s['backward_s']:.3f} | {s['loss_call_s']:.3f} | "
                     f"{s['step_time']:.2f} | {rtxt} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "ratios": ratios, "load_before": load0, "load_after": load1,
                       "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
