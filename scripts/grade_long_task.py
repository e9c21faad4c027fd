#!/usr/bin/env python
"""Grade saved students on the long task independently of the trainer's evaluation.

    python scripts/grade_long_task.py fastopd-demo/release/final fastopd-demo/full/final [--n 200]

Plain ``generate`` on one prompt at a time (no batching, no padding), greedy, 192 new tokens; the answer is
the last ``\\boxed{...}`` compared with the total of the numbers parsed from the problem text here (not with
the prompt file's ``answer`` field, not through fastopd's verifier). The demo's printed accuracies should be
reproduced exactly (docs/training.md, "The demo").
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model folders (e.g. a demo arm's final/)")
    ap.add_argument("--n", type=int, default=200, help="held-out problems (the first n of the shipped file)")
    ap.add_argument("--data", type=Path, default=ROOT / "fastopd" / "assets" / "demo" / "data" / "long_eval.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in args.data.read_text().splitlines()][:args.n]
    out = {}
    for path in args.models:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        right = 0
        for r in rows:
            listed = r["prompt"].split("Find the sum of ", 1)[1].split(", then", 1)[0]
            total = sum(int(x) for x in re.findall(r"\d+", listed))
            enc = tok(r["prompt"], return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=192, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
            text = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            boxed = re.findall(r"\\boxed\{([^}]*)\}", text)
            right += bool(boxed) and boxed[-1].strip() == str(total)
        out[path] = right / len(rows)
        print(f"{path}: {right}/{len(rows)} = {right / len(rows):.1%}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
