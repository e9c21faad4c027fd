"""Where the teacher's signal goes on the long task, and what a student gets right step by step.

``python -m fastopd.demo.diagnose [--student PATH] [--teacher PATH]`` measures, on the student's own sampled
rollouts of training prompts (the states OPD trains on) and on its greedy answers to held-out problems:

- **step accuracy** (:func:`step_accuracy`): besides whole-answer accuracy, the share of derivation sentences
  ``a plus b is c`` whose ``c`` is ``a + b`` of the numbers *as written* (``addition``), and whose ``a`` copies
  the previous written total and ``b`` the next number of the prompt (``copy``): finer signals than the
  answer, which needs every one of 6-11 steps right;
- **where the reverse KL is** (:func:`kl_breakdown`): the exact per-token KL(student || teacher) summed by
  token kind: the results ``c``, the rest of the derivation (copied numbers and fixed words), the boxed
  answer sentence, and the check suffix;
- **the teacher at the results** (:func:`teacher_at_results`): on each sampled derivation sentence, whether the
  chain is intact (``a`` and ``b`` copied right) or broken, and which number the teacher's top-1 is: ``a+b``
  (sound local feedback), or something else.

The numbers are in docs/training.md ("Why distillation did not teach"); nothing here trains.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch

from fastopd.demo.long_task import parse_terms
from fastopd.train.verify import extract_boxed

_STEP = re.compile(r"(\d+) plus (\d+) is (\d+)")
KINDS = ("result", "derivation", "answer", "check")
"""Token kinds of :func:`kl_breakdown`: the result ``c`` of a derivation sentence, the rest of the derivation,
the ``The sum is \\boxed{S}.`` sentence, and the check suffix after it."""


def problem_of(prompt: str) -> str:
    """The problem text of a formatted prompt (``"Q: <problem>\\nA:"``) or of a bare problem."""
    return prompt.split("Q: ", 1)[-1].split("\nA:", 1)[0].strip()


def derivation_steps(prompt: str, text: str) -> list[dict]:
    """The ``a plus b is c`` sentences of a completion before its boxed answer, each with ``addition``
    (c == a + b as written) and ``copy`` (a is the previous written total and b the prompt's next number)."""
    terms = parse_terms(problem_of(prompt))
    steps, prev = [], terms[0]
    for i, m in enumerate(_STEP.finditer(text.split("The sum is", 1)[0])):
        a, b, c = map(int, m.groups())
        term = terms[i + 1] if i + 1 < len(terms) else None
        steps.append({"a": a, "b": b, "c": c, "addition": c == a + b, "copy": a == prev and b == term,
                      "span_c": m.span(3)})
        prev = c
    return steps


def step_accuracy(rows: list[dict], texts: list[str]) -> dict:
    """Whole-answer accuracy and the per-step ``addition`` / ``copy`` shares over all derivation sentences."""
    if len(rows) != len(texts):
        raise ValueError(f"rows and texts must have the same length, got {len(rows)} and {len(texts)}")
    answer = add = copy = n = 0
    for r, t in zip(rows, texts):
        total = sum(parse_terms(problem_of(r["prompt"])))
        boxed = extract_boxed(t)
        answer += boxed is not None and boxed.strip() == str(total)
        for s in derivation_steps(r["prompt"], t):
            add += s["addition"]
            copy += s["copy"]
            n += 1
    return {"answer": answer / max(len(rows), 1), "addition": add / max(n, 1), "copy": copy / max(n, 1),
            "steps": n, "problems": len(rows)}


def _token_starts(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    text, starts = "", []
    for t in ids:
        starts.append(len(text))
        text += tokenizer.decode([t])
    return text, starts


def token_kinds(tokenizer, ids: list[int]) -> list[str]:
    """The kind (:data:`KINDS`) of every token of one completion, by its anchor (its first non-space character,
    as in docs/formulas.md §2)."""
    text, starts = _token_starts(tokenizer, ids)
    cut = text.find("The sum is")
    cut = len(text) if cut < 0 else cut
    end_answer = text.find(".", cut) + 1 if cut < len(text) else len(text)
    results = {m.start(3) for m in _STEP.finditer(text[:cut])}
    kinds = []
    for j, s in enumerate(starts):
        e = starts[j + 1] if j + 1 < len(starts) else len(text)
        piece = text[s:e]
        a = s + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)  # the anchor: first non-space character
        if a < cut:
            kinds.append("result" if any(s <= r < e for r in results) else "derivation")
        else:
            kinds.append("answer" if a < max(end_answer, cut + 1) else "check")
    return kinds


@torch.no_grad()
def sampled_rollouts(student, tokenizer, rows: list[dict], *, temperature: float = 1.0, max_new_tokens: int = 192,
                     seed: int = 0):
    """The student's sampled completions of ``rows`` (one each), as the trainer samples them."""
    from fastopd.train.rollouts import eos_ids_of, generate_completions

    torch.manual_seed(seed)
    return generate_completions(student, tokenizer, [r["prompt"] for r in rows], eos_ids=eos_ids_of(tokenizer, student),
                                max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature)


@torch.no_grad()
def kl_breakdown(student, teacher, tokenizer, rollouts) -> dict:
    """Exact per-token reverse KL(student || teacher) on ``rollouts``, by token kind: tokens, mean KL, share."""
    from fastopd.reference import token_stats
    from fastopd.train.rollouts import completion_logits

    zs, zt = completion_logits(student, rollouts).float(), completion_logits(teacher, rollouts).float()
    kl = token_stats(zs, zt, rollouts.targets, full_kl=True).reverse_kl
    sums, counts = Counter(), Counter()
    for i in range(len(rollouts.texts)):
        ids = rollouts.targets[i][rollouts.valid[i]].tolist()
        for kind, v in zip(token_kinds(tokenizer, ids), kl[i][rollouts.valid[i]].tolist()):
            sums[kind] += v
            counts[kind] += 1
    total_kl, total_n = sum(sums.values()), sum(counts.values())
    return {k: {"tokens": counts[k], "token_share": counts[k] / max(total_n, 1),
                "kl_mean": sums[k] / max(counts[k], 1), "kl_share": sums[k] / max(total_kl, 1e-30)} for k in KINDS}


@torch.no_grad()
def teacher_at_results(teacher, tokenizer, rows: list[dict], rollouts) -> dict:
    """At each result ``c`` of the sampled derivations: the teacher's top-1, by whether the chain is intact.

    Returns ``{"intact"|"broken": {"n", "a+b", "p_a+b"}}``: the share of positions where the teacher's top-1
    is the local sum of the written numbers, and its mean probability there."""
    from fastopd.train.rollouts import completion_logits

    logp = completion_logits(teacher, rollouts).float().log_softmax(-1)
    out = {k: {"n": 0, "a+b": 0, "p_a+b": 0.0} for k in ("intact", "broken")}
    for i, r in enumerate(rows):
        ids = rollouts.targets[i][rollouts.valid[i]].tolist()
        text, starts = _token_starts(tokenizer, ids)
        for s in derivation_steps(r["prompt"], text):
            want = tokenizer.encode(" " + str(s["a"] + s["b"]), add_special_tokens=False)
            if len(want) != 1:
                continue
            j = max(q for q, st in enumerate(starts) if st <= s["span_c"][0])
            d = out["intact" if s["copy"] else "broken"]
            d["n"] += 1
            d["a+b"] += int(logp[i, j].argmax()) == want[0]
            d["p_a+b"] += float(logp[i, j, want[0]].exp())
    for d in out.values():
        if d["n"]:
            d["a+b"] /= d["n"]
            d["p_a+b"] /= d["n"]
    return out


def diagnose(student, teacher, tokenizer, train_rows: list[dict], eval_rows: list[dict], *, n_sampled: int = 128,
             temperature: float = 1.0, max_new_tokens: int = 192, seed: int = 0) -> dict:
    """All of the above for one student/teacher pair (the demo's long task)."""
    from fastopd.train.rollouts import eos_ids_of, generate_completions

    student.eval()
    teacher.eval()
    rows = train_rows[:n_sampled]
    ro = sampled_rollouts(student, tokenizer, rows, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    greedy = generate_completions(student, tokenizer, [r["prompt"] for r in eval_rows],
                                  eos_ids=eos_ids_of(tokenizer, student), max_new_tokens=max_new_tokens, do_sample=False)
    return {"greedy": step_accuracy(eval_rows, greedy.texts), "sampled": step_accuracy(rows, ro.texts),
            "kl": kl_breakdown(student, teacher, tokenizer, ro),
            "teacher_at_results": teacher_at_results(teacher, tokenizer, rows, ro),
            "temperature": temperature, "n_sampled": len(rows), "n_eval": len(eval_rows)}


def main(argv=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastopd.demo.task import demo_asset_paths
    from fastopd.train.data import load_prompts

    paths = demo_asset_paths()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default=str(paths.student))
    ap.add_argument("--teacher", default=str(paths.teacher))
    ap.add_argument("--n-sampled", type=int, default=128, help="sampled rollouts of training prompts")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out problems answered greedily")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(args.student)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    data = Path(paths.root) / "data"
    train_rows = load_prompts(str(data / "long_train.jsonl"))
    eval_rows = load_prompts(str(data / "long_eval.jsonl"))[:args.n_eval]
    res = diagnose(student, teacher, tok, train_rows, eval_rows, n_sampled=args.n_sampled,
                   temperature=args.temperature, seed=args.seed)
    for key in ("greedy", "sampled"):
        g = res[key]
        print(f"{key:8s} answer {g['answer']:.1%}  addition {g['addition']:.1%}  copy {g['copy']:.1%}  "
              f"({g['steps']} steps of {g['problems']} problems)")
    for k, v in res["kl"].items():
        print(f"KL {k:10s} tokens {v['token_share']:5.1%}  mean {v['kl_mean']:.3f}  share {v['kl_share']:5.1%}")
    for k, v in res["teacher_at_results"].items():
        print(f"teacher at results, chain {k:6s}: n {v['n']:4d}  top-1 = a+b {v['a+b']:.1%}  p(a+b) {v['p_a+b']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
