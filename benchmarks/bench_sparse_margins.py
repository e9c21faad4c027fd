"""How often a teacher server's top-k gives the exact margins, demo models (CPU).

How well does a teacher *server's* top-k stand in for the teacher's full logits? (docs/formulas.md §7)


On the shipped demo models (``fastopd/assets/demo/``: the tiny Qwen3 student samples rollouts of the demo's
held-out prompts, the tiny Qwen3 teacher scores them), computes the release rule's margins m_t twice:

- exactly, from both models' full logits (``fastopd.token_stats``, student top-K = 16), and
- sparsely, with :func:`fastopd.sparse_margins` from the student's top-K ids and only the teacher's top-k
  log-probs, for k in ``--teacher-k`` (vLLM's default cap on returned log-probs is 20),

and reports, per k: the fraction of valid tokens whose sparse margin is exact (>= 2 of the student's 16
candidates in the teacher's top-k), the fractions with 1 and 0 inside, and how often the rule's release
segment with sparse margins equals the one with exact margins -- for the rule as configured (min_gain 10)
and for the scan's best split alone (min_gain = -inf: every rollout with a candidate split is "released" at
tau*, a far more sensitive comparison when, as on this demo, the rule rarely fires). Two ways of using the
non-exact tokens are compared: their lower bounds as margins ("bounds"), or leaving them out of the segment
means ("exact only": valid & exact as the rule's mask).

Usage::

    python benchmarks/bench_sparse_margins.py --json benchmarks/results/sparse_margins_demo.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
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
from fastopd.train.rollouts import add_segments, completion_logits, eos_ids_of, generate_completions  # noqa: E402


def _assets_version(root) -> dict:
    """Which demo models were measured: the git commit that last touched them and the weights' sha256."""
    out = {}
    try:
        out["git_commit_of_assets"] = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--", str(root)], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
        ).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        out["git_commit_of_assets"] = None
    for role in ("teacher", "student"):
        h = hashlib.sha256((root / role / "model.safetensors").read_bytes()).hexdigest()
        out[f"{role}_safetensors_sha256"] = h
    return out


def _release(margins, seg, valid, *, k: int, min_gain: float) -> np.ndarray:
    rule = fastopd.ReleaseRule(k=k, min_gain=min_gain)
    return rule.from_margins(margins, seg, valid).release_segment


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-k", type=int, nargs="+", default=[5, 20, 32, 64])
    ap.add_argument("--student-k", type=int, default=16, help="K, the student's candidates (the rule's k)")
    ap.add_argument("--task", choices=["long", "arithmetic"], default="long",
                    help="the demo task whose held-out prompts the student answers (long_eval.jsonl / eval.jsonl)")
    ap.add_argument("--prompts", type=int, default=200, help="held-out demo prompts (each eval file has 200)")
    ap.add_argument("--samples", type=int, default=4, help="sampled completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 192 (long), 72 (arithmetic)")
    ap.add_argument("--batch", type=int, default=200, help="rollouts per generate call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    paths = demo_asset_paths()
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(paths.student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher).eval()
    eos = eos_ids_of(tok, student)
    if args.max_new_tokens is None:
        args.max_new_tokens = 192 if args.task == "long" else 72
    eval_file = "long_eval.jsonl" if args.task == "long" else "eval.jsonl"
    rows = read_jsonl(paths.root / "data" / eval_file)[: args.prompts]
    prompts = [r["prompt"] for r in rows for _ in range(args.samples)]

    t0 = time.perf_counter()
    margins, sparse, segs, valids = [], {k: [] for k in args.teacher_k}, [], []
    for i in range(0, len(prompts), args.batch):
        ro = generate_completions(student, tok, prompts[i:i + args.batch], eos_ids=eos,
                                  max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0)
        add_segments(ro, tok)
        with torch.no_grad():
            zs, zt = completion_logits(student, ro), completion_logits(teacher, ro)
        st = fastopd.token_stats(zs, zt, ro.targets, k=args.student_k, return_topk=True, backend="reference")
        lp_t = torch.log_softmax(zt.float(), dim=-1)  # what a server returns: temperature-1 log-probs
        for k in args.teacher_k:
            vals, ids = torch.topk(lp_t, k, dim=-1)
            sparse[k].append(fastopd.sparse_margins(st.topk_ids, ids, vals))
            sparse[k][-1] = (sparse[k][-1], (st.topk_ids.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).sum(-1))
        margins.append(st.margins)
        segs.append(ro.segment_ids)
        valids.append(st.valid)
    t_roll = time.perf_counter() - t0

    def cat(ts):  # ragged widths across generate calls: right-pad
        w = max(t.shape[1] for t in ts)
        return torch.cat([torch.nn.functional.pad(t, (0, w - t.shape[1])) for t in ts])

    m_exact = cat(margins)
    valid = cat([v.long() for v in valids]).bool()
    seg = cat([s + 1 for s in segs]) - 1  # pad with -1
    n_valid = int(valid.sum())
    base = {g: _release(m_exact, seg, valid, k=args.student_k, min_gain=g) for g in (10.0, -np.inf)}
    accept_exact = float(fastopd.ReleaseRule(k=args.student_k).from_margins(m_exact, seg, valid).scan.accepted.mean())

    results = []
    for k in args.teacher_k:
        sm = cat([s[0].margins for s in sparse[k]])
        ex = cat([s[0].exact.long() for s in sparse[k]]).bool()
        n_in = cat([s[1] for s in sparse[k]])
        row = {
            "teacher_k": k,
            "exact_fraction": float((ex & valid).sum()) / n_valid,
            "one_inside_fraction": float(((n_in == 1) & valid).sum()) / n_valid,
            "none_inside_fraction": float(((n_in == 0) & valid).sum()) / n_valid,
            "max_abs_error_exact_tokens": float((sm - m_exact)[ex & valid].abs().max()) if (ex & valid).any() else None,
            "mean_shortfall_bound_tokens": float((m_exact - sm)[~ex & valid].mean()) if (~ex & valid).any() else 0.0,
        }
        for variant, mask in (("bounds", valid), ("exact_only", valid & ex)):
            for g, name in ((10.0, "rule"), (-np.inf, "best_split")):
                r = _release(sm, seg, mask, k=args.student_k, min_gain=g)
                row[f"release_equal_{name}_{variant}"] = float((r == base[g]).mean())
            row[f"accept_rate_{variant}"] = float(
                fastopd.ReleaseRule(k=args.student_k).from_margins(sm, seg, mask).scan.accepted.mean())
        results.append(row)

    out = {
        "benchmark": "sparse_margins_demo",
        "what": "sparse (teacher top-k) vs exact release margins on the shipped demo models",
        "rollouts": int(valid.shape[0]), "valid_tokens": n_valid, "student_k": args.student_k,
        "task": args.task, "prompts": args.prompts, "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens,
        "seed": args.seed, "accept_rate_exact": accept_exact,
        "rollout_and_scoring_seconds": round(t_roll, 1),
        "assets": _assets_version(paths.root),
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "fastopd": fastopd.__version__},
        "results": results,
    }
    print(f"{out['rollouts']} rollouts, {n_valid} valid tokens, student K = {args.student_k}; "
          f"rule accept rate with exact margins {accept_exact:.2%}\n")
    print("| teacher k | exact tokens | 1 inside | 0 inside | release = exact's (rule, bounds) | "
          "best split = exact's (bounds) | best split = exact's (exact only) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['teacher_k']} | {r['exact_fraction']:.1%} | {r['one_inside_fraction']:.1%} | "
              f"{r['none_inside_fraction']:.1%} | {r['release_equal_rule_bounds']:.1%} | "
              f"{r['release_equal_best_split_bounds']:.1%} | {r['release_equal_best_split_exact_only']:.1%} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
