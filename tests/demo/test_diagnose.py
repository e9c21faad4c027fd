"""Tests of fastopd/demo/diagnose.py: step accuracy and token kinds, against hand-graded completions."""
from __future__ import annotations

import pytest

from fastopd.demo import long_task
from fastopd.demo.diagnose import derivation_steps, step_accuracy, token_kinds
from fastopd.demo.task import format_prompt

PROMPT = format_prompt("Find the sum of 2, 9, 6 and 3, then check every step.")


def test_derivation_steps_grade_additions_and_copies_as_written():
    # step 1 right; step 2 adds wrong (11 + 6 = 16); step 3 miscopies the total (15, not 16) and adds it right
    text = ("We add the numbers from left to right. 2 plus 9 is 11. 11 plus 6 is 16. 15 plus 3 is 18. "
            "The sum is \\boxed{18}. Now we check every step. 7 plus 1 is 9.")
    steps = derivation_steps(PROMPT, text)
    assert [(s["a"], s["b"], s["c"]) for s in steps] == [(2, 9, 11), (11, 6, 16), (15, 3, 18)]  # not the check's
    assert [s["addition"] for s in steps] == [True, False, True]
    assert [s["copy"] for s in steps] == [True, True, False]
    acc = step_accuracy([{"prompt": PROMPT}] * 2, [text, " " + long_task.make_problems(1, 1)[0]["solution"]])
    assert acc["answer"] == 0.0  # 18 is wrong (the total is 20); the other text answers another problem
    with pytest.raises(ValueError, match="same length"):
        step_accuracy([{"prompt": PROMPT}], [])


def test_step_accuracy_of_the_generator_is_perfect():
    probs = long_task.make_problems(20, seed=3)
    acc = step_accuracy([{"prompt": format_prompt(p["prompt"])} for p in probs], [p["solution"] for p in probs])
    assert acc == {"answer": 1.0, "addition": 1.0, "copy": 1.0, "problems": 20,
                   "steps": sum(p["prompt"].count(",") for p in probs)}  # n - 1 steps for n numbers


def test_token_kinds_mark_results_derivation_answer_and_check():
    from transformers import AutoTokenizer

    from fastopd.demo.task import demo_asset_paths

    path = demo_asset_paths().tokenizer
    if not (path / "tokenizer.json").exists():
        pytest.skip("demo tokenizer not built")
    tok = AutoTokenizer.from_pretrained(path)
    text = " We add the numbers from left to right. 2 plus 9 is 11. The sum is \\boxed{11}. Next I check each step."
    ids = tok(text)["input_ids"]
    kinds = token_kinds(tok, ids)
    pieces = [tok.decode([t]) for t in ids]
    assert [p.strip() for p, k in zip(pieces, kinds) if k == "result"] == ["11"]  # the sum, not the boxed 11
    assert "".join(p for p, k in zip(pieces, kinds) if k == "answer").strip() == "The sum is \\boxed{11}."
    assert "".join(p for p, k in zip(pieces, kinds) if k == "check").strip() == "Next I check each step."
    assert kinds[0] == "derivation"
