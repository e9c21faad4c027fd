"""Tests of the trainer's answer verifiers (fastopd/train/verify.py)."""
from __future__ import annotations

import pytest

from fastopd.train.verify import boxed_match, exact_match, extract_boxed, get_verifier, parse_number


@pytest.mark.parametrize("completion, answer, expected", [
    ("The answer is \\boxed{21}.", "21", True),
    ("\\boxed{21.0}", "21", True),
    ("\\boxed{ 21 }", " 21 ", True),
    ("\\boxed{21}", "21.5", False),
    ("\\boxed{3/4}", "0.75", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{0.75}", "3/4", True),
    ("\\boxed{1/3}", "0.33", False),
    ("first \\boxed{5} then \\boxed{7}", "7", True),   # the LAST box counts
    ("first \\boxed{5} then \\boxed{7}", "5", False),
    ("no box here: 21", "21", False),
    ("", "21", False),
    ("\\boxed{\\text{a}{b}}", "\\text{a}{b}", True),   # nested braces kept
    ("\\boxed{{21}}", "21", True),
    ("\\boxed{5} and a truncated \\boxed{7", "5", False),  # unclosed last box: no answer
    ("\\boxed {42}", "42", True),
    ("\\boxed{Paris}", "  paris ", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{-3}", "-3.0", True),
    ("\\boxed{1/0}", "0", False),
    ("\\boxed{21}", "\\boxed{21.00}", True),
])
def test_boxed_match(completion, answer, expected):
    assert boxed_match(completion, answer) is expected


def test_extract_boxed_nested_and_last():
    assert extract_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("\\boxedfoo \\boxed{3}") == "3"
    assert extract_boxed("nothing") is None
    assert parse_number("abc") is None and parse_number(" 2/4 ") == parse_number("0.5")


def test_exact_match():
    assert exact_match("  Hello \n  World ", "hello world")
    assert exact_match("21", " 21\n")
    assert not exact_match("21.0", "21")
    assert not exact_match("hello world!", "hello world")
    with pytest.raises(TypeError, match="completion"):
        exact_match(None, "x")


def test_get_verifier():
    assert get_verifier("exact") is exact_match
    assert get_verifier("boxed") is boxed_match
    with pytest.raises(ValueError) as e:
        get_verifier("regex")
    assert "boxed" in str(e.value) and "exact" in str(e.value) and "regex" in str(e.value)
