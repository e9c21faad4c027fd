"""token_segments (sentence segments) throughput on long completions (CPU).

Times ``fastopd.segment.token_segments`` (docs/formulas.md §2).


Builds a byte-level BPE tokenizer locally (GPT-2 style ByteLevel pre-tokenizer/decoder, trained on a
generated corpus; nothing is downloaded), makes completions of ``--tokens`` tokens of multi-sentence text
(Zipf-distributed pseudo-words, capitalised sentence starts, abbreviations, decimals, LaTeX, newlines and
some multi-byte characters), and times ``token_segments`` on one thread (the median over ``--repeats``
calls, each on a *different* completion). Also times its two parts: Punkt ``sentence_spans`` alone and
``decode_with_anchors`` (ids -> text + anchor characters) alone.

Usage::

    python benchmarks/bench_segments.py --tokens 8192 --repeats 15 --json benchmarks/results/segments_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastopd import segment  # noqa: E402

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "da", "fo", "gi", "ha", "je", "pu", "qua",
              "re", "st", "th", "an", "er", "in", "on", "ex", "al", "ic", "ly", "ment", "tion", "ous"]
_EXTRAS = ["Dr.", "e.g.", "i.e.", "3.5", "0.25", "\\boxed{8}", "$x^2$", "Mr.", "U.S.", "café", "naïve",
           "中文", "😀", "über", "(see", "above)", "x = 2", "vs.", "etc."]


def make_words(rng: np.random.Generator, n: int = 20000) -> list[str]:
    words = set()
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words.add("".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), k)))
    return sorted(words)


def make_text(rng: np.random.Generator, words: list[str], n_sentences: int) -> str:
    ranks = np.arange(1, len(words) + 1, dtype=np.float64)
    p = 1.0 / ranks
    p /= p.sum()
    out = []
    for _ in range(n_sentences):
        n = int(rng.integers(4, 28))
        toks = [words[i] for i in rng.choice(len(words), size=n, p=p)]
        for j in range(n):
            if rng.random() < 0.04:
                toks[j] = _EXTRAS[int(rng.integers(len(_EXTRAS)))]
        toks[0] = toks[0][:1].upper() + toks[0][1:]
        sentence = " ".join(toks) + str(rng.choice([".", ".", ".", "?", "!", ":"]))
        sep = str(rng.choice([" ", " ", " ", "\n", "\n\n"]))
        out.append(sentence + sep)
    return "".join(out)


def build_tokenizer(rng: np.random.Generator, words: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([make_text(rng, words, 200) for _ in range(40)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_completion(rng, words, tokenizer, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens - 1:
        ids += tokenizer.encode(make_text(rng, words, 200), add_special_tokens=False)
    return ids[: n_tokens - 1] + [tokenizer.eos_token_id]


def time_calls(fn, inputs) -> list[float]:
    out = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per completion")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per mode (median reported)")
    ap.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "segments_cpu.json"))
    args = ap.parse_args()

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    rng = np.random.default_rng(args.seed)
    words = make_words(rng)
    tokenizer = build_tokenizer(rng, words, args.vocab)
    completions = [make_completion(rng, words, tokenizer, args.tokens) for _ in range(args.repeats + 1)]
    arrays = [np.asarray(c, dtype=np.int64) for c in completions]

    segment.token_segments(tokenizer, arrays[-1])  # builds the vocabulary table and Punkt once
    texts = [segment.decode_with_anchors(tokenizer, a)[0] for a in arrays[:-1]]
    n_chars = statistics.mean(len(t) for t in texts)
    n_segments = statistics.mean(int(segment.token_segments(tokenizer, a).max()) + 1 for a in arrays[:-1])

    inputs = arrays[:-1]
    rows = []
    for name, fn, data in [
        ("token_segments", lambda a: segment.token_segments(tokenizer, a), inputs),
        ("  part: sentence_spans (Punkt + newline split)", segment.sentence_spans, texts),
        ("  part: decode_with_anchors (ids -> text, anchors)", lambda a: segment.decode_with_anchors(tokenizer, a),
         inputs),
    ]:
        times = time_calls(fn, data)
        med = statistics.median(times)
        rows.append({"what": name.strip(), "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
                     "tokens_per_s": args.tokens / med})

    print(f"\ntoken_segments, byte-level BPE (vocab {len(tokenizer)}), {args.tokens} tokens "
          f"(~{n_chars:.0f} chars, ~{n_segments:.0f} segments) per completion, "
          f"{args.repeats} completions, 1 thread\n")
    print("| what | median ms | min ms | tokens/s (median) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['tokens_per_s']:,.0f} |")
    result = {
        "benchmark": "token_segments",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "vocab_size": len(tokenizer),
        "mean_chars": n_chars,
        "mean_segments": n_segments,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
