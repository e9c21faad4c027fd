"""The long-response demo task: add a list of numbers, then check every step (``SENTENCES``: 16-26 sentences).

A problem lists ``n`` one-digit numbers (``n`` in ``MIN_TERMS..MAX_TERMS``, total at most ``MAX_TOTAL``)::

    prompt:   "Find the sum of 3, 8, 1, 9, 4, 7 and 6, then check every step."
    solution: "We add the numbers from left to right. 3 plus 8 is 11. 11 plus 1 is 12. 12 plus 9 is 21.
               21 plus 4 is 25. 25 plus 7 is 32. 32 plus 6 is 38. The sum is \\boxed{38}.
               Next I verify every step. Line 4 looks fine. Step 2 is correct. Line 6 is right.
               Step 1 looks good. Step 5 is right. Line 3 looks correct. So our total is fine."
    answer:   "38"

The solution has two parts, like what a reasoning model writes:

1. **A derivation whose every token is forced.** The opening sentence is fixed, each running sum
   ``a plus b is c`` copies ``a`` from the previous sentence and ``b`` from the prompt and computes
   ``c``; ``The sum is \\boxed{S}`` copies the last ``c``. Nothing here can be written two ways, so a
   teacher that has learned the task puts almost all of its probability on one token, and the teacher's
   top-1 minus top-2 logit among the student's plausible candidates (the margin m_t of
   docs/formulas.md §1) is large.
2. **A check whose wording and order legitimately vary.** The check re-confirms each of the ``n - 1``
   addition steps once, **in a uniformly random order**, each confirmation phrased by independent,
   uniformly drawn, equally correct choices::

       {Step|Line} <i> {is|looks} {right|correct|fine|good}.

   and it opens with ``{Now|Next} {we|I} {check|verify} {each|every} step.`` and closes with
   ``{So|Thus} {the|our} {sum|total} {is|looks} {right|correct|fine|good}.``. Every slot in braces,
   and the step index while more than one step is left to check, is a free choice between options the
   training data gives *the same probability*. A teacher trained on this text therefore spreads its
   probability evenly over tokens that the student (trained on the same text) also ranks in its top-K:
   on those tokens the teacher's top-1 and top-2 candidates have nearly equal logits and m_t is close
   to 0. Only the period of each sentence (and the last index left) is forced.

So along a rollout the teacher's margin is high over the first part and falls at a point that differs
from rollout to rollout (it depends on ``n`` and on how long the student's derivation is): the "Prefix
Teach, Suffix Fade" pattern that the release rule looks for. The check is not noise: every sentence
asserts that a named step of the derivation holds, every phrasing is correct, and the answer is
verifiable (:func:`check_solution` checks the whole text; the trainer's ``boxed`` verifier grades the
answer). Every number the task writes is at most ``MAX_TOTAL`` = 99, one token of the demo tokenizer.

Both models see :func:`fastopd.demo.task.format_prompt` (``"Q: <problem>\\nA:"``) and continue with
``" " + solution`` + EOS, as on the arithmetic task of :mod:`fastopd.demo.task`, which the shipped
models were also trained on (the out-of-domain task of ``fastopd demo`` and ``fastopd study``).
Train and eval problems are disjoint by content (CRC32 of the prompt, as in :mod:`fastopd.demo.task`).
"""
from __future__ import annotations

import random
import re
from typing import Dict, List

from fastopd.demo.task import draw_problems, format_prompt, split_of  # noqa: F401  (re-exported for the demo)

__all__ = [
    "MIN_TERMS", "MAX_TERMS", "SENTENCES", "MAX_TERM", "MAX_TOTAL", "TRAIN_SEED", "EVAL_SEED", "DEMO_VERIFIER",
    "CHECK_SUBJECTS", "CHECK_VERBS", "CHECK_VERDICTS", "OPEN_WORDS", "CLOSE_WORDS",
    "make_problem", "make_problems", "slipped_solution", "slip_derivation", "check_solution", "parse_terms", "free_slots",
]

MIN_TERMS = 7
"""Fewest numbers in a list (so the shortest solution has 2 * 7 + 2 = 16 sentences)."""
MAX_TERMS = 12
"""Most numbers in a list (the longest solution has 2 * 12 + 2 = 26 sentences)."""
SENTENCES = (2 * MIN_TERMS + 2, 2 * MAX_TERMS + 2)
"""Sentences in the shortest and the longest solution: the opening, ``n - 1`` running sums, the boxed sum, the
check's opening, ``n - 1`` confirmations and the closing sentence."""
MAX_TERM = 9
"""Numbers are drawn from 1..MAX_TERM."""
MAX_TOTAL = 99
"""Lists whose total exceeds this are redrawn, so every running sum is one token."""
TRAIN_SEED = 10
EVAL_SEED = 4321
DEMO_VERIFIER = "boxed"

OPENING = "We add the numbers from left to right."
# the free choices of the check (each drawn uniformly and independently)
OPEN_WORDS = (("Now", "Next"), ("we", "I"), ("check", "verify"), ("each", "every"))
CHECK_SUBJECTS = ("Step", "Line")
CHECK_VERBS = ("is", "looks")
CHECK_VERDICTS = ("right", "correct", "fine", "good")
CLOSE_WORDS = (("So", "Thus"), ("the", "our"), ("sum", "total"), CHECK_VERBS, CHECK_VERDICTS)



def _list_text(terms: List[int]) -> str:
    return ", ".join(str(t) for t in terms[:-1]) + f" and {terms[-1]}"


def make_problem(rng: random.Random, n_terms: int) -> Dict[str, str]:
    """One problem with ``n_terms`` numbers drawn from ``rng`` (total at most ``MAX_TOTAL``).

    Returns ``{"prompt", "answer", "solution"}`` like :func:`fastopd.demo.task.make_problem`.
    """
    if not isinstance(n_terms, int) or not 2 <= n_terms <= MAX_TOTAL:
        raise ValueError(f"n_terms must be an int in [2, {MAX_TOTAL}], got {n_terms!r}")
    while True:
        terms = [rng.randint(1, MAX_TERM) for _ in range(n_terms)]
        if sum(terms) <= MAX_TOTAL:
            break
    sentences = [OPENING]
    total = terms[0]
    for t in terms[1:]:
        sentences.append(f"{total} plus {t} is {total + t}.")
        total += t
    sentences.append(f"The sum is \\boxed{{{total}}}.")
    sentences.append(" ".join(rng.choice(words) for words in OPEN_WORDS) + " step.")
    order = list(range(1, n_terms))
    rng.shuffle(order)
    for i in order:
        sentences.append(f"{rng.choice(CHECK_SUBJECTS)} {i} {rng.choice(CHECK_VERBS)} {rng.choice(CHECK_VERDICTS)}.")
    sentences.append(" ".join(rng.choice(words) for words in CLOSE_WORDS) + ".")
    return {"prompt": f"Find the sum of {_list_text(terms)}, then check every step.", "answer": str(total),
            "solution": " ".join(sentences)}


def slipped_solution(problem: Dict[str, str], rng: random.Random, p_slip: float) -> tuple:
    """The problem's solution with student-like slips in its derivation, and where they are.

    Each ``a plus b is c`` sentence independently, with probability ``p_slip``, gets one slip: a wrong
    result ``c`` (half of the slips), a miscopied running total ``a`` or a miscopied term ``b`` (a quarter
    each). Everything after a slip continues *locally* from what is written: the next sentence copies the
    written ``c``, a miscopied ``a`` or ``b`` is added as written, the boxed answer is the last written
    total, the check is unchanged. Returns ``(solution, spans)``: ``spans`` are the (start, end) character
    ranges of the slipped numbers, which a teacher's SFT leaves out of its loss (so it never learns to slip)
    while it learns to continue soundly from a history with slips: the states a weak student's rollouts are
    in (docs/training.md, "Why distillation did not teach").
    """
    terms = parse_terms(problem["prompt"])
    parts, spans, running = slip_derivation(terms, rng, p_slip)
    rest = problem["solution"].split(" The sum is ", 1)[1]
    rest = "The sum is \\boxed{" + str(running) + "}" + rest[rest.index("}") + 1:]
    return " ".join(parts + [rest]), spans


def slip_derivation(terms: List[int], rng: random.Random, p_slip: float) -> tuple:
    """The opening and the ``a plus b is c`` sentences of ``terms`` with slips, as :func:`slipped_solution`
    describes: ``(sentences, spans, running)``, ``spans`` the character ranges of the slipped numbers in
    ``" ".join(sentences)`` and ``running`` the last written total (shared with :mod:`fastopd.demo.check_task`).
    """
    if not 0.0 <= p_slip <= 1.0:
        raise ValueError(f"p_slip must be in [0, 1], got {p_slip!r}")
    parts: List[str] = [OPENING]
    spans: List[tuple] = []
    text_len = len(OPENING)

    def near(x: int, lo: int, hi: int) -> int:
        for _ in range(20):
            y = x + rng.choice((-10, -2, -1, 1, 2, 10, rng.randint(-9, 9)))
            if y != x and lo <= y <= hi:
                return y
        return x

    running = terms[0]
    for t in terms[1:]:
        a, b = running, t
        kind = rng.choice(("c", "c", "a", "b")) if rng.random() < p_slip else None
        if kind == "a":
            a = near(a, 0, MAX_TOTAL - b)
        elif kind == "b":
            b = near(b, 1, min(MAX_TERM, MAX_TOTAL - a))
        c = a + b
        if kind == "c":
            c = near(c, 0, MAX_TOTAL)
        words = [str(a), "plus", str(b), "is", f"{c}."]
        sentence = " ".join(words)
        start = text_len + 1  # after the joining space
        if kind is not None and (kind != "a" or a != running) and (kind != "b" or b != t) and \
                (kind != "c" or c != a + b):
            idx = {"a": 0, "b": 2, "c": 4}[kind]
            off = start + sum(len(w) + 1 for w in words[:idx])
            spans.append((off, off + len(str((a, b, c)[idx // 2]))))
        parts.append(sentence)
        text_len = start + len(sentence)
        running = c
    return parts, spans, running


def make_problems(n: int, seed: int, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS, split: str = "train",
                  unique: bool = True) -> List[Dict[str, str]]:
    """``n`` problems of ``split``, deterministic given the arguments (as :func:`fastopd.demo.task.make_problems`)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(min_terms, int) or not isinstance(max_terms, int) or not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms (ints), got min_terms={min_terms!r}, "
                         f"max_terms={max_terms!r}")
    rng = random.Random(f"fastopd-long-task/{seed}/{min_terms}/{max_terms}/{split}")
    return draw_problems(n, lambda: make_problem(rng, rng.randint(min_terms, max_terms)), split, unique)


_PROMPT = re.compile(r"^Find the sum of ((?:\d+, )*\d+) and (\d+), then check every step\.$")


def parse_terms(problem_text: str) -> List[int]:
    """The numbers of a problem text (raises ValueError naming the text if it is not one of this task's)."""
    m = _PROMPT.match(problem_text.strip())
    if not m:
        raise ValueError(f"problem_text is not a long-task problem ('Find the sum of a, b and c, then check "
                         f"every step.'), got {problem_text!r}")
    return [int(x) for x in m.group(1).split(", ")] + [int(m.group(2))]


def _alt(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"


_CHECK = re.compile(rf"^{_alt(CHECK_SUBJECTS)} (\d+) {_alt(CHECK_VERBS)} {_alt(CHECK_VERDICTS)}\.$")
_OPEN = re.compile("^" + " ".join(_alt(w) for w in OPEN_WORDS) + r" step\.$")
_CLOSE = re.compile("^" + " ".join(_alt(w) for w in CLOSE_WORDS) + r"\.$")


def grade_derivation(terms: List[int], solution: str):
    """The part both long tasks grade alike: the solution's sentences, the errors of its opening and its running
    sums ``a plus b is c``, and whether the derivation is exactly right. Returns (sentences, errors, ok)."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", solution.strip()) if s]
    errors: List[str] = []
    if not sentences or sentences[0] != OPENING:
        errors.append("missing opening sentence")
    derivation = sentences[1:len(terms)]
    running = terms[0]
    ok = len(derivation) == len(terms) - 1
    for i, s in enumerate(derivation):
        m = re.match(r"^(\d+) plus (\d+) is (\d+)\.$", s)
        if not m or (int(m.group(1)), int(m.group(2)), int(m.group(3))) != (running, terms[i + 1], running + terms[i + 1]):
            ok = False
            errors.append(f"derivation sentence {i + 1} wrong: {s!r}")
        running += terms[i + 1]
    return sentences, errors, ok


def check_solution(problem_text: str, solution: str) -> Dict[str, object]:
    """Grade a whole solution against its problem, independently of the generator.

    Returns ``{"answer_correct", "derivation_correct", "check_complete", "well_formed", "errors"}``:
    the boxed answer is the list's total; every ``a plus b is c`` is the right running sum; the check names
    every step 1..n-1 exactly once; every sentence has one of the task's forms. ``errors`` lists what failed.
    """
    terms = parse_terms(problem_text)
    sentences, errors, ok_derivation = grade_derivation(terms, solution)
    total = sum(terms)
    from fastopd.train.verify import extract_boxed

    boxed = extract_boxed(solution)
    answer_correct = boxed is not None and boxed.strip() == str(total)
    rest = sentences[len(terms):]
    well_formed = ok_derivation and len(rest) == len(terms) + 2
    if well_formed:
        well_formed = (rest[0] == f"The sum is \\boxed{{{total}}}." and bool(_OPEN.match(rest[1]))
                       and bool(_CLOSE.match(rest[-1])))
    named = []
    for s in rest[2:-1]:
        m = _CHECK.match(s)
        if m:
            named.append(int(m.group(1)))
        else:
            well_formed = False
            errors.append(f"not a check sentence: {s!r}")
    check_complete = sorted(named) == list(range(1, len(terms)))
    if not check_complete:
        errors.append(f"check names steps {named}, expected each of 1..{len(terms) - 1} once")
    if not answer_correct:
        errors.append(f"boxed answer {boxed!r}, expected {total}")
    return {"answer_correct": answer_correct, "derivation_correct": ok_derivation, "check_complete": check_complete,
            "well_formed": well_formed and check_complete and answer_correct, "errors": errors}


def free_slots(solution: str) -> int:
    """Number of words of a solution that are free choices of the check (for docs and tests)."""
    n = 0
    for s in re.split(r"(?<=\.)\s+", solution.strip()):
        if _CHECK.match(s):
            n += 3 + 1  # subject, verb, verdict, index (free while several steps are left)
        elif _OPEN.match(s):
            n += len(OPEN_WORDS)
        elif _CLOSE.match(s):
            n += len(CLOSE_WORDS)
    return n
