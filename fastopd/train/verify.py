"""Pluggable answer verifiers: ``verifier(completion, answer) -> bool``.

The trainer looks a verifier up by name with :func:`get_verifier` and calls it on every decoded
completion whose prompt row carries an ``answer``; the fraction of ``True`` is the task accuracy.

- ``"exact"`` — :func:`exact_match`: the whole completion equals the answer up to whitespace and case.
- ``"boxed"`` — :func:`boxed_match`: the content of the LAST ``\\boxed{...}`` in the completion equals
  the answer, comparing numbers by value (``"21" == "21.0" == " 21 "``, ``"3/4" == "0.75"``,
  ``"\\frac{3}{4}" == "0.75"``) and anything else as normalised text.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Dict, Optional

__all__ = ["exact_match", "boxed_match", "extract_boxed", "normalize_text", "parse_number",
           "get_verifier", "VERIFIERS", "Verifier"]

Verifier = Callable[[str, str], bool]


def _check_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace to one space, strip the ends and case-fold."""
    return " ".join(text.split()).casefold()


def exact_match(completion: str, answer: str) -> bool:
    """True iff ``normalize_text(completion) == normalize_text(answer)`` (whitespace- and case-insensitive)."""
    _check_str("completion", completion)
    _check_str("answer", answer)
    return normalize_text(completion) == normalize_text(answer)


_BOXED = "\\boxed"


def extract_boxed(text: str) -> Optional[str]:
    """Content of the LAST ``\\boxed{...}`` in ``text``, matching braces (so nested ``{}`` are kept).

    Returns ``None`` if there is no ``\\boxed{`` or if the last one is never closed (a truncated
    completion has no final answer: we do not fall back to an earlier box). Whitespace between
    ``\\boxed`` and ``{`` is allowed; ``\\boxed 5`` without braces is not recognised.
    """
    _check_str("text", text)
    start = text.rfind(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            return None  # the last box is unbalanced
        # "\boxed" not followed by "{" (e.g. "\boxedfoo"): look further left
        start = text.rfind(_BOXED, 0, start)
    return None


_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _clean_math(text: str) -> str:
    s = "".join(text.split())  # numbers never contain spaces: "1 000" -> "1000"
    s = s.strip("$")
    if s.endswith("."):
        s = s[:-1]
    # "{21}" -> "21" when the whole thing is wrapped in one pair of braces
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and extract_boxed("\\boxed" + s) == s[1:-1]:
        s = s[1:-1]
    return s.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s) else s


def parse_number(text: str) -> Optional[Fraction]:
    """Exact value of ``text`` as a Fraction, or None if it is not a number.

    Accepts integers, decimals (``"21.0"``, ``".5"``, ``"1e3"``), thousands separators (``"1,000"``),
    fractions ``"a/b"`` and ``"\\frac{a}{b}"`` (also ``\\dfrac``/``\\tfrac``), surrounding ``$`` and
    whitespace and a trailing period. Division by zero gives None.
    """
    _check_str("text", text)
    s = _clean_math(text)
    m = _FRAC.match(s)
    if m:
        num, den = m.group(1), m.group(2)
    elif s.count("/") == 1:
        num, den = s.split("/")
    else:
        num, den = s, "1"
    if not (_NUMBER.match(num) and _NUMBER.match(den)):
        return None
    den_v = Fraction(den)
    if den_v == 0:
        return None
    return Fraction(num) / den_v


def boxed_match(completion: str, answer: str) -> bool:
    """True iff the LAST ``\\boxed{...}`` of ``completion`` equals ``answer``.

    Both sides are compared as exact numbers when both parse (:func:`parse_number`, so
    ``"21" == "21.0" == " 21 "`` and ``"3/4" == "0.75"``); otherwise as normalised text
    (:func:`normalize_text`, after the same ``$``/trailing-period cleanup). ``answer`` may itself be
    given as ``"\\boxed{...}"``. A completion without a (closed) box never matches.
    """
    _check_str("completion", completion)
    _check_str("answer", answer)
    got = extract_boxed(completion)
    if got is None:
        return False
    want = extract_boxed(answer)
    if want is None:
        want = answer
    got_v, want_v = parse_number(got), parse_number(want)
    if got_v is not None and want_v is not None:
        return got_v == want_v
    return normalize_text(_clean_text(got)) == normalize_text(_clean_text(want))


def _clean_text(text: str) -> str:
    s = text.strip().strip("$").strip()
    return s[:-1] if s.endswith(".") else s


VERIFIERS: Dict[str, Verifier] = {"exact": exact_match, "boxed": boxed_match}
"""Registry of verifiers by name."""


def get_verifier(name: str) -> Verifier:
    """The verifier registered under ``name`` ("exact" or "boxed"); ValueError listing the names otherwise."""
    if not isinstance(name, str) or name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; choose one of: {', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[name]
