"""The TRL adapter's loss call vs TRL's own DistillationTrainer, demo models: time (CPU).

Builds TRL's ``DistillationTrainer`` (``beta=1``: reverse KL, TRL's default) and fastopd's
``ReleaseDistillationTrainer`` (:mod:`fastopd.integrations.trl`) on the same student, teacher, tokenizer and
config (fastopd/assets/demo; ``per_device_train_batch_size`` prompts of data/train.jsonl, completions of up to
``max_completion_length`` tokens: the arithmetic task, as the docs/integrations.md example was when this was
measured; it now runs the long task), samples one batch of completions with
TRL's own ``_generate_and_score_completions`` (seeded), and times the per-batch loss call of each trainer on that
same batch: ``trainer.compute_loss(model, inputs)`` (both models' forwards and the loss) and ``loss.backward()``
(the loss's backward and the student's).

Methods, run round-robin (each rep runs every method once, in a rotated order, so the shared machine's load
falls on all alike); medians over ``--reps`` reps after ``--warmup`` warm-up reps:

- ``trl``:                TRL's ``DistillationTrainer.compute_loss`` (beta=1);
- ``full``:               fastopd ``opd_mode="full", opd_loss="reverse_kl"`` -- the same loss as ``trl``;
- ``release``:            fastopd ``opd_mode="release", opd_loss="reverse_kl"`` (the rule's weights on it);
- ``full_before``:        ``full`` as the adapter computed it before it skipped the rule in full mode: a
                          ``ReleaseRule("full")`` criterion (sentence segments, margins' BIC scan, the recompute
                          backward), for the before/after comparison in one run;
- ``full_no_topk``:       a probe, not a mode: ``full`` with ``fastopd.reference.topk_candidates`` (the
                          student's top-K candidates of the margin, computed in every chunk) replaced by a
                          constant mask, so the loss is unchanged but the margins are meaningless: how much
                          of ``full``'s time the margins' top-K is;
- ``full_pg``, ``release_pg``: the same with ``opd_loss="pg"`` (the adapter's default loss).

The ratio columns are (method / trl) per rep, their median, so a load spike shared by one rep cancels. The loss
check: ``full``'s loss equals ``trl``'s (|diff| printed; ~1e-7 in fp32), and its gradient too (max |diff| over the
student's parameters, relative to the largest gradient entry).

Then a per-phase profile of each method (a separate round-robin pass, perf_counter spans by monkeypatching,
medians over ``--profile-reps``): the student's and the teacher's forwards (``_get_last_hidden_state``), fastopd's
segmentation (``completion_segments``), the rule (``ReleaseRule.from_margins``), the chunked loss forward (the
autograd Function's forward: fastopd's ``_LinearOPDFunction``, TRL's ``ChunkedDivergenceFunction``) and its
backward, the rest of the backward (the two models' layers), and what is left ("other": argument checks, head
construction, metrics, TRL's gathers).

Usage::

    python benchmarks/bench_trl_adapter.py --reps 30 --json benchmarks/results/trl_adapter_cpu.json \
        --md benchmarks/results/trl_adapter_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

METHODS = {  # name: (opd_mode, opd_loss) for fastopd; None for TRL's own trainer
    "trl": None,
    "full": ("full", "reverse_kl"),
    "release": ("release", "reverse_kl"),
    "full_before": ("full", "reverse_kl"),  # full as the adapter ran it before: the rule's segments + scan
    "full_no_topk": ("full", "reverse_kl"),  # a probe: full with the margins' top-K candidates stubbed out
    "full_pg": ("full", "pg"),
    "release_pg": ("release", "pg"),
}
PHASES = ("student_forward", "teacher_forward", "segments", "rule", "loss_forward", "loss_backward",
          "model_backward", "other")


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def build(args, out_dir):
    """(trainers by method name, the shared student, the batch of inputs)."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastopd.demo.task import demo_asset_paths, read_jsonl
    from fastopd.integrations.trl import ReleaseDistillationConfig, ReleaseDistillationTrainer

    paths = demo_asset_paths()
    tok = AutoTokenizer.from_pretrained(paths.tokenizer, padding_side="left")
    prompts = [r["prompt"] for r in read_jsonl(paths.root / "data" / "train.jsonl")[:args.batch]]
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_pretrained(paths.student)
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher)
    data = Dataset.from_dict({"prompt": prompts})
    base = dict(
        output_dir=out_dir, use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.batch, max_steps=1, max_completion_length=args.completion,
        learning_rate=5e-4, logging_steps=1, report_to=[], save_strategy="no", seed=args.seed, beta=1.0,
        temperature=1.0,
    )
    trainers = {}
    for name, opts in METHODS.items():
        if name not in args.methods:
            continue
        if opts is None:
            trainers[name] = trl.DistillationTrainer(
                model=student, teacher_model=teacher, args=trl.DistillationConfig(**base), train_dataset=data,
                processing_class=tok)
        else:
            mode, loss = opts
            trainers[name] = ReleaseDistillationTrainer(
                model=student, teacher_model=teacher, train_dataset=data, processing_class=tok,
                args=ReleaseDistillationConfig(**base, opd_mode=mode, opd_loss=loss, opd_chunk_size=args.chunk_size))
            trainers[name]._bench_no_topk = name == "full_no_topk"
            if name == "full_before":
                from fastopd import OPDLoss, ReleaseRule

                a = trainers[name].args
                rule = ReleaseRule("full", k=a.opd_k, temperature=a.temperature, min_gain=a.opd_min_gain, seed=a.seed)
                trainers[name].opd_criterion = OPDLoss(loss, rule=rule)
    student.train()
    torch.manual_seed(args.seed)
    first = next(iter(trainers.values()))
    inputs = first._generate_and_score_completions([{"prompt": p} for p in prompts])
    return trainers, student, inputs


def _stub_topk(z, k):
    mask = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    mask[..., :k] = True
    return mask


def loss_call(trainer, student, inputs):
    """(forward s, backward s, loss value) of one loss call: compute_loss, then backward."""
    import fastopd.reference as ref

    student.zero_grad(set_to_none=True)
    for store in trainer._metrics.values():
        store.clear()
    probe = getattr(trainer, "_bench_no_topk", False)
    with patched(ref, "topk_candidates", _stub_topk) if probe else contextlib.nullcontext():
        t0 = time.perf_counter()
        loss = trainer.compute_loss(student, inputs)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(loss.detach())


def grads_of(student):
    return {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}


def check_loss(trainers, student, inputs):
    """full's loss and gradient against TRL's (beta=1) on the same batch."""
    if not {"trl", "full"} <= trainers.keys():
        return {}
    _, _, l_trl = loss_call(trainers["trl"], student, inputs)
    g_trl = grads_of(student)
    _, _, l_full = loss_call(trainers["full"], student, inputs)
    g_full = grads_of(student)
    scale = max(float(g.abs().max()) for g in g_trl.values())
    gdiff = max(float((g_full[n] - g).abs().max()) for n, g in g_trl.items())
    out = {"loss_trl": l_trl, "loss_full": l_full, "loss_abs_diff": abs(l_trl - l_full),
           "grad_max_abs_diff": gdiff, "grad_max_abs": scale, "grad_rel_diff": gdiff / scale,
           "same_grad_params": sorted(g_trl) == sorted(g_full)}
    for name in ("full_before", "full_no_topk"):  # the same loss by the other paths
        if name in trainers:
            out[f"loss_{name}"] = loss_call(trainers[name], student, inputs)[2]
    return out


def time_round_robin(trainers, student, inputs, reps, warmup):
    names = list(trainers)
    fwd, tot = defaultdict(list), defaultdict(list)
    for rep in range(warmup + reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for name in order:
            f, b, _ = loss_call(trainers[name], student, inputs)
            if rep >= warmup:
                fwd[name].append(f)
                tot[name].append(f + b)
    return fwd, tot


# ------------------------------------------------------------------------------------------ the phase profile
class Spans:
    def __init__(self):
        self.acc = defaultdict(float)

    @contextlib.contextmanager
    def span(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.acc[name] += time.perf_counter() - t0

    def wrap(self, name, fn):
        def wrapped(*a, **kw):
            with self.span(name):
                return fn(*a, **kw)
        return wrapped


@contextlib.contextmanager
def patched(obj, attr, value):
    had = attr in vars(obj)
    old = vars(obj)[attr] if had else None
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)


def profile_phases(trainers, student, inputs, reps):
    """Median seconds per phase and method (perf_counter spans; the spans' own cost is a few microseconds).

    Round-robin like the timing: each rep runs every method once, with that method's spans patched in only
    around its own call."""
    import trl.kernels.chunked_divergence as tcd

    import fastopd.integrations.trl as ftrl
    import fastopd.linear as flin

    spans = Spans()

    def patches(name, trainer):
        stack = contextlib.ExitStack()
        teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
        inner_hidden = trainer._get_last_hidden_state

        def hidden(model, *a, **kw):
            with spans.span("teacher_forward" if model is teacher else "student_forward"):
                return inner_hidden(model, *a, **kw)

        fn = tcd.ChunkedDivergenceFunction if name == "trl" else flin._LinearOPDFunction
        stack.enter_context(patched(trainer, "_get_last_hidden_state", hidden))
        stack.enter_context(patched(fn, "forward", staticmethod(spans.wrap("loss_forward", fn.forward))))
        stack.enter_context(patched(fn, "backward", staticmethod(spans.wrap("loss_backward", fn.backward))))
        if name != "trl":
            stack.enter_context(patched(ftrl, "completion_segments", spans.wrap("segments", ftrl.completion_segments)))
            rule = trainer.opd_criterion.rule
            if rule is not None:
                stack.enter_context(patched(rule, "from_margins", spans.wrap("rule", rule.from_margins)))
        return stack

    names = list(trainers)
    rows = {name: defaultdict(list) for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            spans.acc.clear()
            with patches(name, trainers[name]):
                f, b, _ = loss_call(trainers[name], student, inputs)
            acc = dict(spans.acc)
            row = {p: acc.get(p, 0.0) for p in PHASES}
            row["model_backward"] = b - row["loss_backward"]
            row["other"] = f - sum(row[p] for p in ("student_forward", "teacher_forward", "segments", "rule",
                                                    "loss_forward"))
            row["total"] = f + b
            for k, v in row.items():
                rows[name][k].append(v)
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}


def torch_profile(trainer, student, inputs, reps, top):
    """The top ops by self CPU time over ``reps`` loss calls (torch.profiler), as text."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            loss_call(trainer, student, inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ------------------------------------------------------------------------------------------ report
def summarize(fwd, tot):
    names = list(tot)
    res = {}
    for name in names:
        r = {
            "loss_call_median_s": statistics.median(tot[name]),
            "loss_call_p25_s": _quantile(tot[name], 0.25), "loss_call_p75_s": _quantile(tot[name], 0.75),
            "loss_call_min_s": min(tot[name]), "loss_call_max_s": max(tot[name]),
            "forward_median_s": statistics.median(fwd[name]),
            "backward_median_s": statistics.median([t - f for t, f in zip(tot[name], fwd[name])]),
        }
        if "trl" in tot:
            ratios = [a / b for a, b in zip(tot[name], tot["trl"])]
            fr = [a / b for a, b in zip(fwd[name], fwd["trl"])]
            r.update({
                "ratio_median": statistics.median(ratios),
                "ratio_p25": _quantile(ratios, 0.25), "ratio_p75": _quantile(ratios, 0.75),
                "ratio_of_medians": r["loss_call_median_s"] / statistics.median(tot["trl"]),
                "forward_ratio_median": statistics.median(fr),
            })
        res[name] = r
    return res


def table(summary, phases, check, meta) -> str:
    lines = [
        f"TRL adapter loss call vs TRL's own, demo models, batch {meta['batch']} x up to {meta['completion']} "
        f"completion tokens ({meta['valid_tokens']} valid), {meta['threads']} thread(s), {meta['reps']} reps "
        f"round-robin after {meta['warmup']} warm-up; load average before/after {meta['load_before']} / "
        f"{meta['load_after']}",
        "",
        "| method | loss call median (s) | p25-p75 (s) | forward / backward median (s) | ratio to trl (median of per-rep ratios, p25-p75) | forward ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in summary.items():
        ratio = (f"{r['ratio_median']:.3f} ({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f})" if "ratio_median" in r
                 else "")
        fr = f"{r['forward_ratio_median']:.3f}" if "forward_ratio_median" in r else ""
        lines.append(f"| {name} | {r['loss_call_median_s']:.4f} | {r['loss_call_p25_s']:.4f}-{r['loss_call_p75_s']:.4f} "
                     f"| {r['forward_median_s']:.4f} / {r['backward_median_s']:.4f} | {ratio} | {fr} |")
    if check:
        lines += ["", f"Loss check: trl {check['loss_trl']:.7f}, full {check['loss_full']:.7f}, |diff| "
                      f"{check['loss_abs_diff']:.2e}; gradient max |diff| {check['grad_max_abs_diff']:.2e} "
                      f"= {check['grad_rel_diff']:.2e} of the largest gradient entry {check['grad_max_abs']:.2e}"
                      + "".join(f"; {k[5:]} {v:.7f}" for k, v in check.items() if k in ("loss_full_before",
                                                                                      "loss_full_no_topk"))]
    if phases:
        lines += ["", "Per-phase profile (median ms per loss call; perf_counter spans, a separate round-robin pass):", "",
                  "| method | " + " | ".join(PHASES) + " | total |", "|---|" + "---:|" * (len(PHASES) + 1)]
        for name, p in phases.items():
            lines.append(f"| {name} | " + " | ".join(f"{1e3 * p[k]:.1f}" for k in (*PHASES, "total")) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--completion", type=int, default=72)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=None, help="opd_chunk_size (None: fastopd's default)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--torch-profile", default="", help="comma-separated methods to run torch.profiler on")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory() as out_dir:
        trainers, student, inputs = build(args, out_dir)
        check = check_loss(trainers, student, inputs)
        fwd, tot = time_round_robin(trainers, student, inputs, args.reps, args.warmup)
        phases = profile_phases(trainers, student, inputs, args.profile_reps) if args.profile_reps else {}
        profiles = {m: torch_profile(trainers[m], student, inputs, 5, 25)
                    for m in args.torch_profile.split(",") if m}
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    summary = summarize(fwd, tot)
    meta = {
        "batch": args.batch, "completion": args.completion, "completion_width": int(inputs["completion_ids"].shape[1]),
        "prompt_width": int(inputs["prompt_ids"].shape[1]), "valid_tokens": int(inputs["completion_mask"].sum()),
        "threads": args.threads, "reps": args.reps, "warmup": args.warmup, "profile_reps": args.profile_reps,
        "seed": args.seed, "chunk_size": args.chunk_size, "load_before": round(load_before, 2),
        "load_after": round(load_after, 2), "cpus": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }
    import transformers
    import trl

    meta.update(trl=trl.__version__, transformers=transformers.__version__)
    text = table(summary, phases, check, meta)
    print(text)
    for m, t in profiles.items():
        print(f"\ntorch.profiler, {m}, 5 loss calls:\n{t}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "phases_median_s": phases, "loss_check": check,
                       "samples_s": {"loss_call": tot, "forward": fwd}}, f, indent=1)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write("Command: `python benchmarks/bench_trl_adapter.py " + " ".join(argv or sys.argv[1:]) + "`\n\n")
            f.write(text + "\n")
    return summary


if __name__ == "__main__":
    main()
