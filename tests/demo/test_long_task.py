"""Tests of the long-response demo task (fastopd/demo/long_task.py): generator, verifier, why the margin fades."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from fastopd.segment import sentence_spans
from fastopd.demo import long_task as lt
from fastopd.demo.task import split_of
from fastopd.train.verify import boxed_match


def _terms(prompt: str) -> list[int]:
    """The numbers of a prompt by a regex of this test (independent of long_task.parse_terms)."""
    body = re.match(r"^Find the sum of (.*), then check every step\.$", prompt).group(1)
    return [int(x) for x in re.findall(r"\d+", body)]


def test_generator_is_deterministic_disjoint_and_in_range():
    a = lt.make_problems(200, seed=1)
    assert a == lt.make_problems(200, seed=1) and a != lt.make_problems(200, seed=2)
    ev = lt.make_problems(100, seed=1, split="eval")
    assert not {p["prompt"] for p in a} & {p["prompt"] for p in ev}
    assert all(split_of(p["prompt"]) == "eval" for p in ev)
    assert len({p["prompt"] for p in a}) == 200
    sizes = Counter(len(_terms(p["prompt"])) for p in a)
    assert set(sizes) == set(range(lt.MIN_TERMS, lt.MAX_TERMS + 1))
    for p in a:
        t = _terms(p["prompt"])
        assert all(1 <= x <= lt.MAX_TERM for x in t) and sum(t) <= lt.MAX_TOTAL
        assert p["answer"] == str(sum(t)) and boxed_match(p["solution"], p["answer"])


def test_solutions_span_SENTENCES_and_check_every_step_once():
    counts = set()
    for p in lt.make_problems(100, seed=3):
        n = len(_terms(p["prompt"]))
        spans = sentence_spans(" " + p["solution"])  # the segmenter the release rule uses
        assert len(spans) == 2 * n + 2
        counts.add(len(spans))
        named = [int(i) for i in re.findall(r"(?:Step|Line) (\d+) (?:is|looks)", p["solution"])]
        assert sorted(named) == list(range(1, n))
        res = lt.check_solution(p["prompt"], p["solution"])
        assert res["well_formed"] and not res["errors"], res
    assert (min(counts), max(counts)) == lt.SENTENCES == (16, 26)  # what `fastopd demo --help` says


def test_check_choices_are_uniform_and_the_order_varies():
    """The check's wording and order are free: every option appears about equally often."""
    probs = lt.make_problems(2000, seed=4, unique=False)
    verdicts = Counter(re.findall(r"(?:Step|Line) \d+ (?:is|looks) (\w+)\.", " ".join(p["solution"] for p in probs)))
    total = sum(verdicts.values())
    assert set(verdicts) == set(lt.CHECK_VERDICTS)
    for v in verdicts.values():
        assert abs(v / total - 0.25) < 0.02
    firsts = Counter(int(re.search(r"step\. (?:Step|Line) (\d+)", p["solution"]).group(1)) for p in probs)
    assert len(firsts) >= 6  # the first step re-checked is not always step 1


def test_verifier_catches_wrong_answers_and_broken_checks():
    p = lt.make_problems(1, seed=5)[0]
    sol, total = p["solution"], int(p["answer"])
    assert lt.check_solution(p["prompt"], sol)["well_formed"]
    wrong = sol.replace(f"\\boxed{{{total}}}", f"\\boxed{{{total + 1}}}")
    r = lt.check_solution(p["prompt"], wrong)
    assert not r["answer_correct"] and not r["well_formed"]
    # a wrong running sum in the derivation
    first = re.search(r"(\d+) plus (\d+) is (\d+)\.", sol)
    bad = sol.replace(first.group(0), f"{first.group(1)} plus {first.group(2)} is {int(first.group(3)) + 1}.", 1)
    assert not lt.check_solution(p["prompt"], bad)["derivation_correct"]
    # a check that names a step twice and forgets another
    checks = re.findall(r"(?:Step|Line) (\d+) (?:is|looks)", sol)
    dup = re.sub(r"(Step|Line) \d+ (is|looks)", rf"\g<1> {checks[1]} \g<2>", sol, count=1)
    r = lt.check_solution(p["prompt"], dup)
    assert not r["check_complete"] and any("check names" in e for e in r["errors"])
    # a rephrased but equally correct check is accepted
    alt = re.sub(r"(Step|Line) (\d+) is (\w+)\.", r"Line \2 looks \3.", sol)
    assert lt.check_solution(p["prompt"], alt)["well_formed"]
    with pytest.raises(ValueError, match="problem_text"):
        lt.check_solution("Start with 3. Add 2. What is the result?", sol)


def test_most_check_words_are_free_choices():
    """Why the margin fades: most words of the check are one of several equally likely options."""
    p = lt.make_problems(1, seed=6)[0]
    check = p["solution"].split("The sum is")[1].split(". ", 1)[1]
    words = len(check.replace(".", "").split())
    assert lt.free_slots(p["solution"]) >= 0.75 * words


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="n must be"):
        lt.make_problems(-1, seed=0)
    with pytest.raises(ValueError, match="min_terms"):
        lt.make_problems(3, seed=0, min_terms=5, max_terms=4)
    with pytest.raises(ValueError, match="split"):
        lt.make_problems(3, seed=0, split="test")
    with pytest.raises(ValueError, match="n_terms"):
        lt.make_problem(random.Random(0), 1)


def test_shipped_tokenizer_encodes_the_long_task_word_by_word():
    """Every word of the check is one token, so each free choice is one token choice (asset check)."""
    from pathlib import Path

    from fastopd.demo.task import demo_asset_paths, format_prompt, solution_completion

    paths = demo_asset_paths()
    if not Path(paths.tokenizer).exists():
        pytest.skip("demo assets not built")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    for p in lt.make_problems(30, seed=lt.EVAL_SEED, split="eval"):
        prompt, completion = format_prompt(p["prompt"]), solution_completion(p)
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == prompt + completion
        assert ids == tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
        assert len(ids) - len(tok(prompt, add_special_tokens=False)["input_ids"]) <= 190  # fits max_new_tokens 192
    for w in (*lt.CHECK_SUBJECTS, *lt.CHECK_VERBS, *lt.CHECK_VERDICTS, *[x for ws in lt.OPEN_WORDS for x in ws],
              *[x for ws in lt.CLOSE_WORDS for x in ws]):
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w


def test_slipped_solution_continues_locally_and_marks_only_the_slips():
    """Every sentence after a slip adds what is written; the spans cover exactly the numbers that break the
    chain (a wrong result, a miscopied total or term), checked by re-deriving the chain here."""
    rng = random.Random(5)
    slips = 0
    for p in lt.make_problems(200, seed=7):
        terms = _terms(p["prompt"])
        text, spans = lt.slipped_solution(p, rng, 0.3)
        marked = {a for a, _ in spans}
        assert all(text[a:b].isdigit() for a, b in spans)
        prev = terms[0]
        found = 0
        for i, m in enumerate(re.finditer(r"(\d+) plus (\d+) is (\d+)\.", text)):
            a, b, c = map(int, m.groups())
            wrong = {m.start(1): a != prev, m.start(2): b != terms[i + 1], m.start(3): c != a + b}
            assert sum(wrong.values()) <= 1  # at most one slip per sentence
            for pos, is_wrong in wrong.items():
                assert (pos in marked) == is_wrong, (text, spans)
            found += 1
            prev = c
        assert found == len(terms) - 1
        assert re.search(r"\\boxed\{(\d+)\}", text).group(1) == str(prev)  # the last written total is boxed
        assert text.split("The sum is")[1].split(".", 1)[1] == p["solution"].split("The sum is")[1].split(".", 1)[1]
        slips += len(spans)
    assert 0.2 < slips / sum(len(_terms(p["prompt"])) - 1 for p in lt.make_problems(200, seed=7)) < 0.4
    text, spans = lt.slipped_solution(lt.make_problems(1, seed=7)[0], rng, 0.0)
    assert spans == [] and text == lt.make_problems(1, seed=7)[0]["solution"]
    with pytest.raises(ValueError, match="p_slip"):
        lt.slipped_solution(lt.make_problems(1, seed=7)[0], rng, 1.5)
