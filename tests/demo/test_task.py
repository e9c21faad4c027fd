"""Tests of the demo task (fastopd/demo/task.py) and the shipped demo assets (fastopd/assets/demo/), graded by
the trainer's verifiers. Fast: < 30 s on a 2-core CPU."""
from __future__ import annotations

import re

import pytest

from fastopd.demo.task import (
    EVAL_SEED, MAX_STEPS, MAX_VALUE, MIN_STEPS, SENTENCES, TRAIN_SEED, demo_asset_paths, format_prompt, make_problems, read_jsonl,
    solution_completion, split_of, write_jsonl,
)
from fastopd.train.verify import boxed_match, extract_boxed


# ------------------------------------------------------------------------------------------ the task
def _independent_eval(prompt: str) -> int:
    """Re-evaluate a prompt with a regex, independently of task.py's generator and evaluate_steps."""
    start = re.match(r"^Start with (\d+)\. ", prompt)
    assert start, prompt
    value = int(start.group(1))
    steps = re.findall(r"(Add|Subtract|Multiply by) (\d+)\.", prompt)
    assert prompt.endswith(" What is the result?"), prompt
    for op, k in steps:
        value = {"Add": value + int(k), "Subtract": value - int(k), "Multiply by": value * int(k)}[op]
        assert 0 <= value <= MAX_VALUE, prompt
    return value


def test_make_problems_deterministic_by_seed():
    a = make_problems(50, seed=3)
    b = make_problems(50, seed=3)
    c = make_problems(50, seed=4)
    assert a == b
    assert a != c
    assert make_problems(20, seed=3, split="eval") == make_problems(20, seed=3, split="eval")


def test_make_problems_steps_and_fields():
    probs = make_problems(300, seed=TRAIN_SEED, min_steps=2, max_steps=5)
    n_steps = {len(re.findall(r"(Add|Subtract|Multiply by) \d+\.", p["prompt"])) for p in probs}
    assert n_steps == {2, 3, 4, 5}
    assert all(set(p) == {"prompt", "answer", "solution"} for p in probs)
    probs3 = make_problems(50, seed=1, min_steps=3, max_steps=3)
    assert all(len(re.findall(r"(Add|Subtract|Multiply by) \d+\.", p["prompt"])) == 3 for p in probs3)
    with pytest.raises(ValueError, match="min_steps"):
        make_problems(5, seed=0, min_steps=4, max_steps=2)
    with pytest.raises(ValueError, match="split"):
        make_problems(5, seed=0, split="test")


def test_solutions_are_correct_and_multi_sentence():
    for split, seed in (("train", TRAIN_SEED), ("eval", EVAL_SEED)):
        for p in make_problems(500, seed=seed, split=split):
            truth = _independent_eval(p["prompt"])
            assert int(p["answer"]) == truth
            assert boxed_match(p["solution"], str(truth)), p
            assert not boxed_match(p["solution"], str(truth + 1))
            n_steps = len(re.findall(r"(Add|Subtract|Multiply by) \d+\.", p["prompt"]))
            # one sentence for the start, one per step, one for the final answer
            assert p["solution"].count(". ") + 1 == n_steps + 2, p["solution"]
            assert p["solution"].endswith(f"The answer is \\boxed{{{truth}}}.")


def test_default_problems_span_SENTENCES():
    """The sentence range of `fastopd demo --help` is what the default problems have."""
    counts = {p["solution"].count(". ") + 1 for p in make_problems(300, seed=TRAIN_SEED)}
    assert (min(counts), max(counts)) == SENTENCES == (MIN_STEPS + 2, MAX_STEPS + 2) == (4, 7)


def test_train_and_eval_are_disjoint():
    train = make_problems(5000, seed=TRAIN_SEED, unique=False)
    evals = make_problems(500, seed=EVAL_SEED, split="eval")
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in evals}
    assert all(split_of(p["prompt"]) == "eval" for p in evals)
    # even the same seed gives disjoint splits
    assert not ({p["prompt"] for p in make_problems(500, seed=7)}
                & {p["prompt"] for p in make_problems(500, seed=7, split="eval")})
    assert len({p["prompt"] for p in evals}) == len(evals)  # unique=True by default


def test_format_prompt_and_jsonl(tmp_path):
    assert format_prompt("Start with 1. Add 2. What is the result?") == \
        "Q: Start with 1. Add 2. What is the result?\nA:"
    probs = make_problems(5, seed=0)
    path = write_jsonl(tmp_path / "sub" / "train.jsonl", probs)
    rows = read_jsonl(path)
    assert [r["prompt"] for r in rows] == [format_prompt(p["prompt"]) for p in probs]
    assert [r["answer"] for r in rows] == [p["answer"] for p in probs]
    assert all(set(r) == {"prompt", "answer"} for r in rows)
    assert set(read_jsonl(write_jsonl(tmp_path / "s.jsonl", probs, with_solution=True))[0]) == \
        {"prompt", "answer", "solution"}


# ------------------------------------------------------------------------------------------ shipped assets
_PATHS = demo_asset_paths()
_needs_assets = pytest.mark.skipif(
    not all((_PATHS[k] / "config.json").exists() for k in ("teacher", "student"))
    or not (_PATHS.tokenizer / "tokenizer.json").exists(),
    reason="demo assets missing from fastopd/assets/demo; build them with "
           "`python scripts/build_demo_assets.py`")


@_needs_assets
def test_tokenizer_round_trips_task_text():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_PATHS.tokenizer)
    assert tok.eos_token is not None and tok.pad_token is not None and tok.eos_token_id != tok.pad_token_id
    for p in make_problems(50, seed=EVAL_SEED, split="eval"):
        prompt, completion = format_prompt(p["prompt"]), solution_completion(p)
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == prompt + completion
        # prompt and completion tokenise independently (what the trainer relies on when it appends samples)
        assert ids == tok(prompt, add_special_tokens=False)["input_ids"] + \
            tok(completion, add_special_tokens=False)["input_ids"]
    weird = "Ünïcödé 🙂 text\twith\nodd bytes {}\\"
    assert tok.decode(tok(weird, add_special_tokens=False)["input_ids"]) == weird


def _greedy(model, tok, probs, max_new_tokens=64):
    import torch

    tok.padding_side = "left"
    enc = tok([format_prompt(p["prompt"]) for p in probs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@_needs_assets
def test_shipped_teacher_solves_held_out_problems_and_student_is_weaker():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(_PATHS.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(_PATHS.teacher)
    student = AutoModelForCausalLM.from_pretrained(_PATHS.student)
    assert next(teacher.parameters()).dtype == torch.float32  # config.dtype makes the default load fp32
    assert student.config.vocab_size == teacher.config.vocab_size == len(tok)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())

    # the demo's in-domain task: the long one (build: teacher 99.5%, student 16.5% on 200 problems)
    from fastopd.demo import long_task

    probs = long_task.make_problems(20, seed=long_task.EVAL_SEED, split="eval")
    texts = _greedy(teacher, tok, probs, max_new_tokens=192)
    correct = sum(boxed_match(t, p["answer"]) for t, p in zip(texts, probs))
    assert correct >= 18, f"teacher solved {correct}/20; e.g. {texts[:2]}"
    assert sum(long_task.check_solution(p["prompt"], t)["well_formed"] for t, p in zip(texts, probs)) >= 16
    assert sum(t.count(". ") >= 15 for t in texts) >= 18  # long answers: 16-26 sentences

    s_texts = _greedy(student, tok, probs, max_new_tokens=192)
    s_correct = sum(boxed_match(t, p["answer"]) for t, p in zip(s_texts, probs))
    assert s_correct < correct, f"student solved {s_correct}/20, teacher {correct}/20"

    # the arithmetic task (the OOD task of the default demo; build: teacher 30.5%, student 3.5%)
    probs = make_problems(40, seed=EVAL_SEED, split="eval")
    texts = _greedy(teacher, tok, probs)
    correct = sum(boxed_match(t, p["answer"]) for t, p in zip(texts, probs))
    assert sum(t.count(". ") >= 3 for t in texts) >= 32  # solutions run over several sentences
    s_correct = sum(boxed_match(t, p["answer"]) for t, p in zip(_greedy(student, tok, probs), probs))
    assert s_correct < correct, f"arithmetic: student solved {s_correct}/40, teacher {correct}/40"
    # the weak student still writes the right format: several sentences and a final boxed answer
    assert sum(extract_boxed(t) is not None and t.count(". ") >= 2 for t in s_texts) >= 14, s_texts[:3]


@_needs_assets
def test_shipped_teacher_judges_the_students_own_broken_chains():
    """OPD trains on the student's own rollouts, where a sampled derivation breaks its chain (a miscopied total
    or term, a wrong sum) in most sentences. There the teacher's top-1 at a result ``c`` must be the sum of the
    numbers as written (sound local feedback). The first demo teacher, trained on clean solutions only, did this
    at 62.5% of such results of the first student's rollouts and 85% of the current student's (docs/training.md,
    "Why distillation did not teach"); this test fails on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastopd.demo.diagnose import sampled_rollouts, teacher_at_results
    from fastopd.train.data import load_prompts

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(_PATHS.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(_PATHS.student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(_PATHS.teacher).eval()
    rows = load_prompts(str(_PATHS.root / "data" / "long_train.jsonl"))[:48]
    res = teacher_at_results(teacher, tok, rows, sampled_rollouts(student, tok, rows, seed=0))
    assert res["broken"]["n"] >= 80 and res["intact"]["n"] >= 30, res  # the student's chains do break
    assert res["intact"]["a+b"] >= 0.95, res
    assert res["broken"]["a+b"] >= 0.9, res
