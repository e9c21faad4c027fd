"""The check task: a derivation of 2-14 forced steps, then a check of a length the prompt sets, often none.

On the long task (:mod:`fastopd.demo.long_task`) the derivation and the check both have ``n - 1``
sentences, so the teacher's margin fades near 55 % of every rollout and a fixed cut there does as well
as the release rule. Here the two lengths are drawn **independently**, so the place where the fade sets in
varies from rollout to rollout and cannot be read off the rollout's length::

    prompt:   "Find the sum of 3, 8, 1 and 4, then check 5 steps."
    solution: "We add the numbers from left to right. 3 plus 8 is 11. 11 plus 1 is 12. 12 plus 4 is 16.
               The sum is \\boxed{16}. Next I verify 5 steps. Line 2 looks fine. Step 3 is right.
               Step 2 is good. Line 1 looks right. Step 3 looks correct. So our total is fine."

    prompt:   "Find the sum of 5, 2, 9, 7 and 6, with no check."
    solution: "We add the numbers from left to right. 5 plus 2 is 7. 7 plus 9 is 16. 16 plus 7 is 23.
               23 plus 6 is 29. The sum is \\boxed{29}."

- **The derivation** (``n - 1`` steps, ``n`` in ``MIN_TERMS..MAX_TERMS`` = 3..15, so 2-14 steps) is the long
  task's: every token is forced (each running sum copies the previous total and the next term), so a
  teacher that has learned it has a large margin m_t (docs/formulas.md §1) there.
- **The check** has ``k`` confirmations, ``k`` drawn independently of ``n``: no check with probability
  ``NO_CHECK_FRACTION`` (1/4), else a short check (``k`` uniform in 1..2) or a long one (9..12), equally
  likely (``CHECK_LENGTHS``). Its opening
  ``{Now|Next} {we|I} {check|verify} <k> step(s).`` copies ``k`` from the prompt; each confirmation
  ``{Step|Line} <i> {is|looks} {right|correct|fine|good}.`` names a step ``i`` drawn uniformly from
  ``1..n-1`` (repeats allowed, so ``k`` need not be at most ``n - 1``), and the closing sentence is the long
  task's. Every slot in braces and every index is a free choice between options the data gives the same
  probability, so on the check the teacher's margin is close to 0 except at the periods and at the close
  after the ``k``-th confirmation.
- **No check** (a quarter of the problems): the solution ends at the boxed sum; every token is forced, the
  margin never fades, and the release rule should keep the rollout whole.

The fraction of a solution that precedes the check (:func:`fade_fraction`) therefore spreads over
most of [0.2, 1]. Every number written is at most ``MAX_TOTAL`` = 99 (one token of the demo tokenizer,
the one the shipped models use); the words are those of the long task plus ``with``/``no``, which the demo
tokenizer writes in a few tokens. Both models see :func:`fastopd.demo.task.format_prompt` and continue
with ``" " + solution`` + EOS; answers are graded by the ``boxed`` verifier; train and eval problems are
disjoint by CRC32 of the prompt (:func:`fastopd.demo.task.split_of`).
"""
from __future__ import annotations

import random
import re
from typing import Dict, List, Optional

from fastopd.demo.long_task import (CHECK_SUBJECTS, CHECK_VERBS, CHECK_VERDICTS, CLOSE_WORDS, MAX_TERM, MAX_TOTAL,
                                    OPENING, grade_derivation, slip_derivation)
from fastopd.demo.task import draw_problems, format_prompt, split_of  # noqa: F401  (re-exported for the demo)

__all__ = [
    "MIN_TERMS", "MAX_TERMS", "MAX_CHECKS", "NO_CHECK_FRACTION", "CHECK_LENGTHS", "SENTENCES", "MAX_TERM", "MAX_TOTAL",
    "TRAIN_SEED", "EVAL_SEED", "DEMO_VERIFIER", "OPEN_WORDS",
    "make_problem", "make_problems", "slipped_solution", "check_solution", "parse_problem", "has_check",
    "is_problem", "fade_fraction",
]

MIN_TERMS = 3
"""Fewest numbers in a list (2 derivation steps)."""
MAX_TERMS = 15
"""Most numbers in a list (14 derivation steps)."""
MAX_CHECKS = 12
"""Most confirmations in a check."""
NO_CHECK_FRACTION = 0.25
"""Probability that a problem asks for no check."""
CHECK_LENGTHS = ((1, 2), (9, MAX_CHECKS))
"""A check is short (1-2 confirmations) or long (9-12), each with probability (1 - NO_CHECK_FRACTION) / 2, its
length uniform in the range: a brief or a thorough verification. Two ranges rather than one (1-12) spread the
position of the fade more: over problems with a check, the interquartile range of the check's start as a
fraction of the solution's tokens (demo tokenizer) is 0.26 (0.49-0.76), against 0.19 with k uniform in 1..12."""
SENTENCES = (MIN_TERMS + 1, MAX_TERMS + 1 + MAX_CHECKS + 2)
"""Sentences in the shortest solution (opening, 2 running sums, the boxed sum) and the longest (14 running
sums, then the check's opening, 12 confirmations and the closing)."""
TRAIN_SEED = 20
EVAL_SEED = 5432
DEMO_VERIFIER = "boxed"
OPEN_WORDS = (("Now", "Next"), ("we", "I"), ("check", "verify"))
"""The check's opening: these free choices, then the number of steps the prompt asks for."""

_PREFIX = "Find the sum of "


def _steps(k: int) -> str:
    return f"{k} step" + ("s" if k != 1 else "")


def _list_text(terms: List[int]) -> str:
    return ", ".join(str(t) for t in terms[:-1]) + f" and {terms[-1]}"


def _prompt(terms: List[int], n_checks: int) -> str:
    tail = f"then check {_steps(n_checks)}" if n_checks else "with no check"
    return f"{_PREFIX}{_list_text(terms)}, {tail}."


def _check_sentences(rng: random.Random, n_terms: int, n_checks: int) -> List[str]:
    if n_checks == 0:
        return []
    out = [" ".join(rng.choice(words) for words in OPEN_WORDS) + f" {_steps(n_checks)}."]
    for _ in range(n_checks):
        out.append(f"{rng.choice(CHECK_SUBJECTS)} {rng.randint(1, n_terms - 1)} {rng.choice(CHECK_VERBS)} "
                   f"{rng.choice(CHECK_VERDICTS)}.")
    out.append(" ".join(rng.choice(words) for words in CLOSE_WORDS) + ".")
    return out


def make_problem(rng: random.Random, n_terms: int, n_checks: int) -> Dict[str, str]:
    """One problem with ``n_terms`` numbers (total at most ``MAX_TOTAL``) and ``n_checks`` confirmations.

    Returns ``{"prompt", "answer", "solution"}`` like :func:`fastopd.demo.long_task.make_problem`.
    """
    if not isinstance(n_terms, int) or not 2 <= n_terms <= MAX_TOTAL:
        raise ValueError(f"n_terms must be an int in [2, {MAX_TOTAL}], got {n_terms!r}")
    if not isinstance(n_checks, int) or n_checks < 0:
        raise ValueError(f"n_checks must be a non-negative int, got {n_checks!r}")
    while True:
        terms = [rng.randint(1, MAX_TERM) for _ in range(n_terms)]
        if sum(terms) <= MAX_TOTAL:
            break
    sentences, _, total = slip_derivation(terms, rng, 0.0)
    sentences.append(f"The sum is \\boxed{{{total}}}.")
    sentences += _check_sentences(rng, n_terms, n_checks)
    return {"prompt": _prompt(terms, n_checks), "answer": str(total), "solution": " ".join(sentences)}


def _draw_checks(rng: random.Random) -> int:
    if rng.random() < NO_CHECK_FRACTION:
        return 0
    return rng.randint(*rng.choice(CHECK_LENGTHS))


def make_problems(n: int, seed: int, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS, split: str = "train",
                  unique: bool = True) -> List[Dict[str, str]]:
    """``n`` problems of ``split``, deterministic given the arguments (as :func:`fastopd.demo.task.make_problems`):
    the number of terms uniform in ``min_terms..max_terms``, the check's length drawn independently of it."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(min_terms, int) or not isinstance(max_terms, int) or not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms (ints), got min_terms={min_terms!r}, "
                         f"max_terms={max_terms!r}")
    rng = random.Random(f"fastopd-check-task/{seed}/{min_terms}/{max_terms}/{split}")

    def draw():
        n_terms = rng.randint(min_terms, max_terms)
        return make_problem(rng, n_terms, _draw_checks(rng))

    return draw_problems(n, draw, split, unique)


_PROMPT = re.compile(r"^Find the sum of ((?:\d+, )*\d+) and (\d+), (?:then check (\d+) steps?|with no check)\.$")


def parse_problem(problem_text: str) -> tuple:
    """``(terms, n_checks)`` of a problem text (raises ValueError naming the text if it is not one of this
    task's). Accepts the formatted prompt (``"Q: ...\\nA:"``) too."""
    text = problem_text.strip()
    if text.startswith("Q: ") and text.endswith("\nA:"):
        text = text[3:-3].strip()
    m = _PROMPT.match(text)
    if not m:
        raise ValueError(f"problem_text is not a check-task problem ('Find the sum of a, b and c, then check k "
                         f"steps.' or '..., with no check.'), got {problem_text!r}")
    terms = [int(x) for x in m.group(1).split(", ")] + [int(m.group(2))]
    return terms, int(m.group(3) or 0)


def is_problem(problem: Dict[str, str]) -> bool:
    """Whether a problem (``{"prompt", ...}``) is one of this task's."""
    return _PROMPT.match(problem["prompt"].strip()) is not None


def has_check(problem_text: str) -> bool:
    """Whether the problem asks for a check (its solution then has a fading suffix)."""
    return parse_problem(problem_text)[1] > 0


def slipped_solution(problem: Dict[str, str], rng: random.Random, p_slip: float) -> tuple:
    """The solution with student-like slips in its derivation (:func:`fastopd.demo.long_task.slipped_solution`:
    same slips, same masking spans), the check (if any) unchanged. Returns ``(solution, spans)``."""
    terms, _ = parse_problem(problem["prompt"])
    parts, spans, running = slip_derivation(terms, rng, p_slip)
    rest = problem["solution"].split(" The sum is ", 1)[1]
    rest = "The sum is \\boxed{" + str(running) + "}" + rest[rest.index("}") + 1:]
    return " ".join(parts + [rest]), spans


def _alt(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"


_CHECK = re.compile(rf"^{_alt(CHECK_SUBJECTS)} (\d+) {_alt(CHECK_VERBS)} {_alt(CHECK_VERDICTS)}\.$")
_OPEN = re.compile("^" + " ".join(_alt(w) for w in OPEN_WORDS) + r" (\d+) steps?\.$")
_CLOSE = re.compile("^" + " ".join(_alt(w) for w in CLOSE_WORDS) + r"\.$")
_BOXED_SENTENCE = re.compile(r"The sum is \\boxed\{[^}]*\}\.")


def fade_fraction(solution: str) -> Optional[float]:
    """Where the check begins in a solution text, as a fraction of its characters (stripped): the start of
    the sentence after ``The sum is \\boxed{..}.``; 1.0 when nothing follows it (no check), None when the
    text has no such sentence. A character proxy of the token fraction the release rule reports."""
    text = solution.strip()
    m = _BOXED_SENTENCE.search(text)
    if m is None or not text:
        return None
    rest = text[m.end():]
    if not rest.strip():
        return 1.0
    return (m.end() + len(rest) - len(rest.lstrip())) / len(text)


def check_solution(problem_text: str, solution: str) -> Dict[str, object]:
    """Grade a whole solution against its problem, independently of the generator.

    Returns ``{"answer_correct", "derivation_correct", "check_complete", "well_formed", "errors"}``: the boxed
    answer is the list's total; every ``a plus b is c`` is the right running sum; the check has exactly the
    number of confirmations the prompt asks for (none and no check sentence at all for "with no check"),
    each naming a step in ``1..n-1``; every sentence has one of the task's forms.
    """
    terms, n_checks = parse_problem(problem_text)
    sentences, errors, ok_derivation = grade_derivation(terms, solution)
    total = sum(terms)
    from fastopd.train.verify import extract_boxed

    boxed = extract_boxed(solution)
    answer_correct = boxed is not None and boxed.strip() == str(total)
    if not answer_correct:
        errors.append(f"boxed answer {boxed!r}, expected {total}")
    rest = sentences[len(terms):]
    well_formed = ok_derivation and bool(rest) and rest[0] == f"The sum is \\boxed{{{total}}}."
    check = rest[1:]
    if n_checks == 0:
        check_complete = not check
        if check:
            errors.append(f"asked for no check, got {len(check)} sentences after the sum")
    else:
        opened = bool(check) and _OPEN.match(check[0])
        closed = len(check) >= 2 and _CLOSE.match(check[-1])
        if not opened or int(opened.group(1)) != n_checks:
            errors.append(f"check opening missing or not for {n_checks} steps: {check[:1]!r}")
        if not closed:
            errors.append("check closing sentence missing")
        named = []
        for s in check[1:-1]:
            m = _CHECK.match(s)
            if m and 1 <= int(m.group(1)) < len(terms):
                named.append(int(m.group(1)))
            else:
                errors.append(f"not a check sentence of this problem: {s!r}")
        check_complete = bool(opened and closed) and int(opened.group(1)) == n_checks and \
            len(named) == len(check) - 2 == n_checks
        if len(check) - 2 != n_checks:
            errors.append(f"check has {max(0, len(check) - 2)} confirmations, expected {n_checks}")
    return {"answer_correct": answer_correct, "derivation_correct": ok_derivation, "check_complete": check_complete,
            "well_formed": bool(well_formed and check_complete and answer_correct), "errors": errors}
