"""Tests of the check task (fastopd/demo/check_task.py): the fade's position varies independently of length."""
from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from fastopd.demo import check_task as ct
from fastopd.demo.task import split_of
from fastopd.segment import sentence_spans
from fastopd.train.verify import boxed_match

_PROMPT = re.compile(r"^Find the sum of (.*), (?:then check (\d+) steps?|with no check)\.$")


def _parse(prompt: str) -> tuple:
    """Terms and asked checks by a regex of this test (independent of check_task.parse_problem)."""
    m = _PROMPT.match(prompt)
    return [int(x) for x in re.findall(r"\d+", m.group(1))], int(m.group(2) or 0)


def _checks(solution: str) -> list[int]:
    return [int(i) for i in re.findall(r"(?:Step|Line) (\d+) (?:is|looks)", solution)]


def test_generator_is_deterministic_disjoint_and_in_range():
    a = ct.make_problems(300, seed=1)
    assert a == ct.make_problems(300, seed=1) and a != ct.make_problems(300, seed=2)
    ev = ct.make_problems(100, seed=1, split="eval")
    assert not {p["prompt"] for p in a} & {p["prompt"] for p in ev}
    assert all(split_of(p["prompt"]) == "eval" for p in ev) and all(split_of(p["prompt"]) == "train" for p in a)
    assert len({p["prompt"] for p in a}) == 300
    sizes = Counter(len(_parse(p["prompt"])[0]) for p in a)
    assert set(sizes) == set(range(ct.MIN_TERMS, ct.MAX_TERMS + 1))
    for p in a:
        terms, k = _parse(p["prompt"])
        assert all(1 <= x <= ct.MAX_TERM for x in terms) and sum(terms) <= ct.MAX_TOTAL
        assert p["answer"] == str(sum(terms)) and boxed_match(p["solution"], p["answer"])
        assert ct.parse_problem(p["prompt"]) == (terms, k)
        assert ct.is_problem(p) and ct.has_check(p["prompt"]) == (k > 0)


def test_check_length_is_independent_of_the_derivation_and_often_absent():
    probs = ct.make_problems(4000, seed=3, unique=False)
    pairs = np.array([(len(t) - 1, k) for t, k in (_parse(p["prompt"]) for p in probs)])
    steps, checks = pairs[:, 0], pairs[:, 1]
    assert 0.2 <= (checks == 0).mean() <= 0.3  # at least a fifth have no check
    allowed = {0} | {k for lo, hi in ct.CHECK_LENGTHS for k in range(lo, hi + 1)}
    assert set(checks.tolist()) == allowed
    assert abs(np.corrcoef(steps, checks)[0, 1]) < 0.05  # drawn independently
    # the share without a check is the same for short and long derivations
    short, long_ = checks[steps <= 5], checks[steps >= 11]
    assert abs((short == 0).mean() - (long_ == 0).mean()) < 0.05


def test_solution_has_the_asked_check_and_its_sentences():
    for p in ct.make_problems(200, seed=4):
        terms, k = _parse(p["prompt"])
        named = _checks(p["solution"])
        assert len(named) == k and all(1 <= i < len(terms) for i in named)
        spans = sentence_spans(" " + p["solution"])  # the segmenter the release rule uses
        assert len(spans) == len(terms) + 1 + (k + 2 if k else 0)
        assert ct.SENTENCES[0] <= len(spans) <= ct.SENTENCES[1]
        res = ct.check_solution(p["prompt"], p["solution"])
        assert res["well_formed"] and not res["errors"], res
        if k == 0:
            assert p["solution"].endswith(f"\\boxed{{{p['answer']}}}.")


def test_fade_position_spreads():
    """Where the check starts, as a fraction of the solution: spread widely over problems with a check, 1.0 with
    none (what the precondition's interquartile range of release fractions is measured against)."""
    probs = ct.make_problems(2000, seed=5, unique=False)
    fr = np.array([ct.fade_fraction(p["solution"]) for p in probs])
    has = np.array([ct.has_check(p["prompt"]) for p in probs])
    assert (fr[~has] == 1.0).all() and (fr[has] < 1.0).all()
    q1, q3 = np.percentile(fr[has], [25, 75])
    assert q3 - q1 >= 0.25
    p = probs[int(np.flatnonzero(has)[0])]
    start = p["solution"].index("\\boxed")
    start = p["solution"].index(". ", start) + 2
    assert ct.fade_fraction(p["solution"]) == pytest.approx(start / len(p["solution"]))
    assert ct.fade_fraction("no boxed sum here.") is None


def test_verifier_catches_wrong_answers_and_wrong_checks():
    probs = ct.make_problems(100, seed=6)
    p = next(q for q in probs if _parse(q["prompt"])[1] >= 2)
    sol, total = p["solution"], int(p["answer"])
    wrong = sol.replace(f"\\boxed{{{total}}}", f"\\boxed{{{total + 1}}}")
    r = ct.check_solution(p["prompt"], wrong)
    assert not r["answer_correct"] and not r["well_formed"]
    first = re.search(r"(\d+) plus (\d+) is (\d+)\.", sol)
    bad = sol.replace(first.group(0), f"{first.group(1)} plus {first.group(2)} is {int(first.group(3)) + 1}.", 1)
    assert not ct.check_solution(p["prompt"], bad)["derivation_correct"]
    # one confirmation too few
    short = re.sub(r" (?:Step|Line) \d+ (?:is|looks) \w+\.", "", sol, count=1)
    r = ct.check_solution(p["prompt"], short)
    assert not r["check_complete"] and r["answer_correct"] and any("confirmations" in e for e in r["errors"])
    # a step the problem does not have
    n = len(_parse(p["prompt"])[0])
    out_of_range = re.sub(r"(Step|Line) \d+ ", rf"\g<1> {n} ", sol, count=1)
    assert not ct.check_solution(p["prompt"], out_of_range)["check_complete"]
    # a check where none was asked
    q = next(q for q in probs if _parse(q["prompt"])[1] == 0)
    r = ct.check_solution(q["prompt"], q["solution"] + " Now we check 1 step. Step 1 is right. So the sum is fine.")
    assert r["answer_correct"] and not r["check_complete"] and not r["well_formed"]
    with pytest.raises(ValueError, match="problem_text"):
        ct.check_solution("Find the sum of 1, 2 and 3, then check every step.", sol)
    assert ct.parse_problem("Q: " + p["prompt"] + "\nA:") == ct.parse_problem(p["prompt"])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="n must be"):
        ct.make_problems(-1, seed=0)
    with pytest.raises(ValueError, match="min_terms"):
        ct.make_problems(3, seed=0, min_terms=5, max_terms=4)
    with pytest.raises(ValueError, match="split"):
        ct.make_problems(3, seed=0, split="test")
    with pytest.raises(ValueError, match="n_terms"):
        ct.make_problem(random.Random(0), 1, 2)
    with pytest.raises(ValueError, match="n_checks"):
        ct.make_problem(random.Random(0), 4, -1)


def test_slipped_solution_keeps_the_check_and_marks_the_slips():
    rng = random.Random(5)
    for p in ct.make_problems(100, seed=7):
        text, spans = ct.slipped_solution(p, rng, 0.3)
        assert all(text[a:b].isdigit() for a, b in spans)
        assert text.split("\\boxed{")[1].split("}", 1)[1] == p["solution"].split("\\boxed{")[1].split("}", 1)[1]
        written = [int(c) for c in re.findall(r"is (\d+)\.", text.split("The sum is")[0])]
        assert re.search(r"\\boxed\{(\d+)\}", text).group(1) == str(written[-1])
    p = ct.make_problems(1, seed=7)[0]
    assert ct.slipped_solution(p, rng, 0.0) == (p["solution"], [])


def test_shipped_tokenizer_writes_every_number_as_one_token():
    from pathlib import Path

    from fastopd.demo.task import demo_asset_paths, format_prompt, solution_completion

    paths = demo_asset_paths()
    if not Path(paths.tokenizer).exists():
        pytest.skip("demo assets not built")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    longest = 0
    for p in ct.make_problems(300, seed=ct.EVAL_SEED, split="eval"):
        prompt, completion = format_prompt(p["prompt"]), solution_completion(p)
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == prompt + completion
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        longest = max(longest, len(ids) - n_prompt)
        for num in re.findall(r"\d+", completion):
            assert int(num) <= ct.MAX_TOTAL
    assert longest < 192  # the demo's max_new_tokens, with room for EOS
    for n in range(ct.MAX_TOTAL + 1):
        assert len(tok(f" {n}", add_special_tokens=False)["input_ids"]) == 1, n
