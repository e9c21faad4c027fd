"""``fastopd example``: the release rule on one built-in rollout, end to end, on a CPU.

The shipped demo student (a tiny Qwen3 model) samples a solution to a built-in problem of the long task
(``--task long``, the default: a derivation the teacher is sure of, then a freely phrased check where its
margin fades, so the rule releases the check) or of the short arithmetic task (``--task arithmetic``,
where the margin does not fall and the rule keeps every token); the shipped teacher scores it; fastopd computes the per-token statistics (docs/formulas.md §1), the sentence
segments (section 2), the profiled RSS-BIC release point (section 3) and the weights (section 4), and
prints, per segment, its text, its mean margin and whether it is kept or released, then what the rule did:
the BIC gain against the threshold, the sentence it released from and the fraction of tokens it kept.

Use ``--completion TEXT`` to score a completion of your own instead of a sampled one.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

DEFAULT_PROBLEMS = {
    # the first held-out problem of the long task (fastopd/assets/demo/data/long_eval.jsonl, the assets README's
    # example); on seeds 0-4 the rule accepts it with gains 49-53 and keeps 59 of 107 tokens
    "long": "Find the sum of 2, 9, 6, 9, 2, 8, 6 and 9, then check every step.",
    "arithmetic": "Start with 7. Add 5. Multiply by 2. Subtract 3. Add 9. What is the result?",
}
"""The built-in problem of each task (``--task``)."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``fastopd example`` (also used by the CLI to print ``--help``)."""
    p = parser or argparse.ArgumentParser(prog="fastopd example", description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=tuple(DEFAULT_PROBLEMS), default="long",
                   help="whose built-in problem to run: long (default; an 8-number sum and its check, where the "
                   "rule releases the check) or arithmetic (a 4-step chain, where the rule keeps every token)")
    p.add_argument("--problem", default=None, help="problem text (default: the --task's built-in problem)")
    p.add_argument("--completion", default=None, help="score this completion instead of sampling one")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the student (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="student sampling temperature (default 1.0)")
    p.add_argument("--k", type=int, default=16, help="student candidates for the margin (default 16)")
    p.add_argument("--min-segments", type=int, default=2, help="m of the BIC scan (default 2)")
    p.add_argument("--min-gain", type=float, default=10.0, help="accept threshold on the BIC gain (default 10)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the result to this JSON file")
    return p


def check_args(args: argparse.Namespace) -> None:
    """A ValueError naming the flag for every bad value, before any model is loaded."""
    from pathlib import Path

    if args.k < 2:
        raise ValueError(f"--k must be >= 2 (the student's top-K candidates of the margin), got {args.k}")
    if args.min_segments < 1:
        raise ValueError(f"--min-segments must be >= 1, got {args.min_segments}")
    if math.isnan(args.min_gain):
        raise ValueError(f"--min-gain must be a number (-inf accepts every split), got {args.min_gain}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.json_path:
        folder = Path(args.json_path).expanduser().parent
        if not folder.is_dir():
            raise FileNotFoundError(f"--json {args.json_path}: the folder {str(folder)!r} does not exist")
        if Path(args.json_path).is_dir():
            raise IsADirectoryError(f"--json {args.json_path}: is a folder; give a file name")


def run(args: argparse.Namespace) -> dict:
    """Run the example and return its result as a dict (also printed as a table)."""
    check_args(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import fastopd
    from fastopd.demo.task import demo_asset_paths, format_prompt

    paths = demo_asset_paths()
    for name in ("teacher", "student", "tokenizer"):
        if not paths[name].exists():
            raise FileNotFoundError(
                f"the shipped demo {name} is missing at {paths[name]}; rebuild it with scripts/build_demo_assets.py"
            )
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).eval()
    problem = DEFAULT_PROBLEMS[args.task] if args.problem is None else args.problem
    prompt_ids = tok(format_prompt(problem), return_tensors="pt").input_ids
    with torch.no_grad():
        if args.completion is None:
            out = student.generate(
                prompt_ids, do_sample=True, temperature=args.temperature, top_p=1.0, max_new_tokens=160,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
            completion_ids = out[0, prompt_ids.shape[1]:]
        else:
            text = args.completion if args.completion.startswith(" ") else " " + args.completion
            completion_ids = torch.tensor(tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id])
        full = torch.cat([prompt_ids[0], completion_ids])[None]
        p = prompt_ids.shape[1]
        zs = student(full).logits[0, p - 1:-1]
        zt = teacher(full).logits[0, p - 1:-1]
    vocab = len(tok)
    rule = fastopd.ReleaseRule(k=min(args.k, vocab), min_segments=args.min_segments, min_gain=args.min_gain)
    stats = fastopd.token_stats(zs, zt, completion_ids, k=rule.k, vocab_size=vocab)
    seg = fastopd.token_segments(tok, completion_ids.tolist())
    dec = rule.from_margins(stats.margins[None], seg[None], stats.valid[None])
    series, scan, weights = dec.series, dec.scan, dec.weights[0]
    segments = []
    for g, x in zip(series.segment_ids.tolist(), series.values.tolist()):
        in_seg = torch.as_tensor(seg) == g
        ids = completion_ids[in_seg]
        segments.append({
            "segment": g,
            "text": tok.decode(ids, skip_special_tokens=True).strip(),
            "tokens": int(len(ids)),
            "mean_margin": x,
            "kept": bool((weights[in_seg] > 0).any()),
        })
    result = {
        "problem": problem,
        "completion": tok.decode(completion_ids, skip_special_tokens=True).strip(),
        "segments": segments,
        "gain": float(scan.gain[0]),
        "accepted": bool(scan.accepted[0]),
        "release_index": int(scan.release_index[0]),
        "release_segment": int(dec.release_segment[0]),
        "tokens": int(stats.valid.sum()),
        "tokens_kept": int((weights > 0).sum()),
        "kept_fraction": float((weights > 0).sum() / stats.valid.sum()),
        "mean_advantage": float(stats.advantages.mean()),
    }
    _print(result, args.min_gain)
    if args.json_path:  # strict JSON: the -inf gain of a rollout without a split is null
        from fastopd.train.runlog import finite_json

        with open(args.json_path, "w") as f:
            json.dump(finite_json(result), f, indent=2, allow_nan=False)
    return result


def _print(result: dict, min_gain: float) -> None:
    print(f"problem:    {result['problem']}")
    print(f"completion: {result['completion']}\n")
    print(f"{'seg':>3}  {'tokens':>6}  {'mean margin':>11}  {'':8}  text")
    for s in result["segments"]:
        state = "kept" if s["kept"] else "released"
        text = s["text"] if len(s["text"]) <= 60 else s["text"][:57] + "..."
        print(f"{s['segment']:>3}  {s['tokens']:>6}  {s['mean_margin']:>11.3f}  {state:8}  {text}")
    gain = result["gain"]
    gain_s = "-inf (no downward split)" if gain == -math.inf else f"{gain:.2f}"
    verdict = "accepted" if result["accepted"] else f"not accepted (needs > {min_gain:g})"
    print(f"\nBIC gain: {gain_s}; {verdict}")
    kept = f"{result['tokens_kept']} of {result['tokens']} tokens supervised (kept fraction {result['kept_fraction']:.2f})"
    if result["accepted"]:
        released = [s for s in result["segments"] if not s["kept"]]
        print(f"release point: segment {result['release_segment']} — {kept}")
        print(f"the rule released the last {len(released)} of {len(result['segments'])} segments, from "
              f"\"{released[0]['text']}\" on: the teacher's margin falls there, so those tokens get no loss")
    else:
        print(f"release point: none — {kept}")
        print("the rule kept every segment: no downward split of the margins beats the threshold")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastopd example``."""
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
