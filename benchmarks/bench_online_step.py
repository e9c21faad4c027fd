"""An online-release training step against full OPD and a fixed budget of the same length, demo long task (CPU).

Three arms of the trainer (``fastopd.train``) on the demo's long task (``fastopd.demo.demo_config(task="long")``:
the shipped tiny Qwen3 student and teacher, 8 prompts x 4 samples per step, up to 192 new tokens, forward KL,
one thread), each built from the same seed:

- ``full``: the student samples with HF ``generate``, every token is trained (``mode: full``);
- ``truncate``: the same with ``max_new_tokens`` = the online arm's mean generated length (measured by a
  calibration run of ``--calib-steps`` online steps from the same seed, not timed), ``weights: full``;
- ``online``: ``sampler: online`` (the rule decided while sampling; ``--chunk-size`` tokens per chunk).

The arms' steps are interleaved (step s of every arm, in a rotated order, before step s+1), each arm on its own
copy of the global RNG state, so the machine's load falls on all alike and each arm samples as it would alone.
Prints the median over ``--steps`` steps (after ``--warmup``) of the trainer's per-phase seconds (sampling, split
for online into the teacher's chunk scoring, the rule and the decoding; the loss's teacher forward, the student's
forward + loss, backward, optimizer), the tokens generated and the teacher's tokens, and the per-step paired
ratios online/full and online/truncate (their medians).

``--decode-reps N``: also the decoding loop alone: :func:`fastopd.train.online_sampler.sample_online` with the
rule off (``confirm_segments`` beyond every series) and ``compact=False`` samples the same tokens as
``model.generate`` from the same seed (checked); its seconds minus the teacher's and the rule's against
``generate``'s, interleaved, median of N.

``--chunk-sizes 4,8,16,32``: also the online arm at each ``online_chunk_size`` (interleaved, as above): sampling
seconds, tokens generated, the overshoot (tokens generated past the kept ones) and the step's seconds.

Usage::

    python benchmarks/bench_online_step.py --steps 6 --decode-reps 5 --chunk-sizes 4,8,16,32 \\
        --json benchmarks/results/online_step_cpu.json --md benchmarks/results/online_step_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASES = ("time_step", "time_generate", "gen_decode", "time_generate_teacher", "time_generate_rule", "time_teacher",
          "time_student_forward", "time_rule", "time_backward", "time_optimizer")
COUNTS = ("tokens_generated", "teacher_tokens", "tokens", "tokens_supervised", "generate_row_steps")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def arm_configs(base, args, out: Path, truncate_len: int | None) -> dict:
    arms = {"full": dict(mode="full"), "online": dict(mode="online", online_chunk_size=args.chunk_size)}
    if truncate_len is not None:
        arms["truncate"] = dict(mode=None, sampler="student", weights="full", max_new_tokens=truncate_len)
    return {name: dataclasses.replace(base, **kw, output_dir=str(out / name)) for name, kw in arms.items()}


def build(cfgs: dict) -> dict:
    import torch

    from fastopd.train.setup import setup

    runs = {}
    for name, cfg in cfgs.items():
        run = setup(cfg)
        runs[name] = (run, torch.get_rng_state())  # each arm's own RNG, from the seed set by setup
    return runs


def interleave(runs: dict, steps: int) -> dict[str, list[dict]]:
    """Step s of every arm (rotated order) before step s+1; each arm on its own RNG state."""
    import torch

    from fastopd.train.trainer import train_step

    names = list(runs)
    rec = {n: [] for n in names}
    for step in range(1, steps + 1):
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            run, state = runs[name]
            torch.set_rng_state(state)
            m = train_step(run, step)
            runs[name] = (run, torch.get_rng_state())
            m["gen_decode"] = m["time_generate"] - m.get("time_generate_teacher", 0.0) - m.get("time_generate_rule", 0.0)
            rec[name].append({k: float(m.get(k, 0.0)) for k in PHASES + COUNTS})
    return rec


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def step_table(rec: dict, warmup: int) -> tuple[str, dict]:
    arms = [a for a in ("full", "truncate", "online") if a in rec]
    rows = {a: rec[a][warmup:] for a in arms}
    out = {"median": {a: {k: med(rows[a], k) for k in PHASES + COUNTS} for a in arms}, "ratios": {}}
    lines = ["| phase (median s / step) | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for k in PHASES + COUNTS:
        fmt = "{:.3f}" if k in PHASES else "{:,.0f}"
        lines.append(f"| {k} | " + " | ".join(fmt.format(out["median"][a][k]) for a in arms) + " |")
    for other in ("full", "truncate"):
        if other not in rows or "online" not in rows:
            continue
        for k in ("time_step", "time_generate", "tokens_generated", "teacher_tokens"):
            ratios = [o[k] / f[k] for o, f in zip(rows["online"], rows[other]) if f[k]]
            out["ratios"][f"online/{other} {k}"] = statistics.median(ratios) if ratios else float("nan")
    lines += ["", "| paired ratio (median over steps) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in out["ratios"].items()]
    return "\n".join(lines), out


def decode_section(base, reps: int) -> tuple[str, dict]:
    """The online sampler's decoding (teacher and rule excluded) against generate on the same batch and tokens."""
    import torch

    from fastopd import StatsOptions
    from fastopd.train.models import load_model, load_tokenizer
    from fastopd.train.online_sampler import sample_online
    from fastopd.train.rollouts import eos_ids_of, generate_completions

    tok = load_tokenizer(base.tokenizer)
    student = load_model(base.student, dtype=torch.float32, attn="sdpa").eval()
    teacher = load_model(base.teacher, dtype=torch.float32, attn="sdpa").eval()
    rows = [json.loads(line) for line in Path(base.train_data).read_text().splitlines()[:base.prompts_per_step]]
    prompts = [r["prompt"] for r in rows for _ in range(base.num_samples)]
    eos = eos_ids_of(tok, student)

    def online(seed):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        r = sample_online(student, teacher, tok, prompts, eos_ids=eos, max_new_tokens=base.max_new_tokens,
                          confirm_segments=10**9, compact=False, stats=StatsOptions(vocab_size=len(tok)))
        total = time.perf_counter() - t0
        return r, total - r.online.time_teacher - r.online.time_rule

    def generate(seed):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        g = generate_completions(student, tok, prompts, eos_ids=eos, max_new_tokens=base.max_new_tokens,
                                 do_sample=True)
        return g, time.perf_counter() - t0

    online(0), generate(0)  # warm-up
    res = []
    for rep in range(reps):
        pair = {}
        for name in (("online", "generate") if rep % 2 else ("generate", "online")):
            pair[name] = (online if name == "online" else generate)(rep + 1)
        (r, t_on), (g, t_gen) = pair["online"], pair["generate"]
        w = min(r.targets.shape[1], g.targets.shape[1])
        same = torch.equal(r.targets[:, :w], g.targets[:, :w]) and torch.equal(r.lengths, g.lengths)
        res.append({"online_decode_s": t_on, "generate_s": t_gen, "ratio": t_on / t_gen, "same_tokens": bool(same),
                    "row_steps": int(r.online.decode_rows)})
    out = {"reps": res, "median_ratio": statistics.median(x["ratio"] for x in res),
           "median_online_decode_s": statistics.median(x["online_decode_s"] for x in res),
           "median_generate_s": statistics.median(x["generate_s"] for x in res),
           "all_same_tokens": all(x["same_tokens"] for x in res)}
    md = (f"decoding, {len(prompts)} rollouts x {base.max_new_tokens} new tokens, no stop, same tokens as generate: "
          f"{out['all_same_tokens']}; online decode {out['median_online_decode_s']:.3f} s vs generate "
          f"{out['median_generate_s']:.3f} s, median paired ratio **{out['median_ratio']:.3f}x**")
    return md, out


def chunk_section(base, args, out: Path) -> tuple[str, dict]:
    sizes = [int(x) for x in args.chunk_sizes.split(",")]
    cfgs = {f"c{c}": dataclasses.replace(base, mode="online", online_chunk_size=c, output_dir=str(out / f"c{c}"))
            for c in sizes}
    rec = interleave(build(cfgs), args.warmup + args.chunk_steps)
    res = {}
    lines = [("| online_chunk_size | step s | sampling s | teacher s | rule s | decode s | tokens generated | "
              "kept tokens | overshoot |"), "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sizes:
        rows = rec[f"c{c}"][args.warmup:]
        r = {k: med(rows, k) for k in PHASES + COUNTS}
        r["overshoot"] = med([{"x": x["tokens_generated"] - x["tokens"]} for x in rows], "x")
        res[c] = r
        lines.append(f"| {c} | {r['time_step']:.3f} | {r['time_generate']:.3f} | {r['time_generate_teacher']:.3f} | "
                     f"{r['time_generate_rule']:.3f} | {r['gen_decode']:.3f} | {r['tokens_generated']:,.0f} | "
                     f"{r['tokens']:,.0f} | {r['overshoot']:,.0f} |")
    return "\n".join(lines), res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each arm left out of the medians")
    ap.add_argument("--calib-steps", type=int, default=3, help="online steps that set truncate's length")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=None, help="the online arm's online_chunk_size "
                    "(default: the trainer's)")
    ap.add_argument("--decode-reps", type=int, default=0)
    ap.add_argument("--chunk-sizes", default="", help="e.g. 4,8,16,32: the chunk-size sweep")
    ap.add_argument("--chunk-steps", type=int, default=4, help="timed steps per chunk size")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)

    import torch

    from fastopd.demo.demo import demo_config
    from fastopd.train.models import quiet_transformers
    from fastopd.train.trainer import train_step

    torch.set_num_threads(1)
    started = load()
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        out = Path(tmp)
        base, _ = demo_config(out / "base", quick=False, seed=args.seed, task="long", progress=False, num_threads=1,
                              steps=args.warmup + args.steps)
        base = dataclasses.replace(base, eval_every=0, save_every=0, log_rollouts=False, eval_data=None,
                                   eval_size=0, eval_at_start=False)
        if args.chunk_size is None:
            args.chunk_size = base.online_chunk_size
        # calibration: the online arm's mean generated length from the same seed sets truncate's budget
        calib = build({"online": dataclasses.replace(base, mode="online", online_chunk_size=args.chunk_size,
                                                     output_dir=str(out / "calib"))})["online"][0]
        gen = [train_step(calib, s) for s in range(1, args.calib_steps + 1)]
        truncate_len = max(1, round(sum(m["tokens_generated"] for m in gen) / sum(m["rollouts"] for m in gen)))
        del calib
        rec = interleave(build(arm_configs(base, args, out, truncate_len)), args.warmup + args.steps)
        table, res = step_table(rec, args.warmup)
        sections = [(f"## Training step, demo long task ({base.prompts_per_step} x {base.num_samples} rollouts, "
                     f"max_new_tokens {base.max_new_tokens}, online_chunk_size {args.chunk_size}, truncate length "
                     f"{truncate_len}; median of {args.steps} interleaved steps after {args.warmup} warm-up)"), "",
                    table]
        result = {"steps": rec, "summary": res, "truncate_len": truncate_len, "chunk_size": args.chunk_size}
        if args.decode_reps:
            md, result["decode"] = decode_section(base, args.decode_reps)
            sections += ["", "## Decoding loop", "", md]
        if args.chunk_sizes:
            md, result["chunk_sweep"] = chunk_section(base, args, out)
            sections += ["", f"## Chunk-size sweep (online arm; median of {args.chunk_steps} interleaved steps)", "",
                         md]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}"
    result.update(machine=machine, load_start=started, load_end=load(), torch=torch.__version__,
                  python=sys.version.split()[0])
    header = (f"# bench_online_step ({time.strftime('%Y-%m-%d')})\n\nMachine: {machine}, torch {torch.__version__}, "
              f"1 thread; load average (1/5/15 min) at start {started}, at end {result['load_end']} (shared "
              "machine: compare ratios within this run, not seconds across runs).\n")
    text = header + "\n" + "\n".join(sections) + "\n"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
