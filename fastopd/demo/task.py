"""Synthetic multi-step arithmetic task for the embedded CPU demo of on-policy distillation.

A problem is a chain of ``MIN_STEPS``-``MAX_STEPS`` (2-5) small integer operations::

    prompt:   "Start with 7. Add 5. Multiply by 2. Subtract 3. What is the result?"
    solution: "We start with 7. Adding 5 gives 12. Multiplying by 2 gives 24. Subtracting 3 gives 21.
               The answer is \\boxed{21}."
    answer:   "21"

The solution runs over one sentence per step plus a final-answer sentence, so the release rule of
docs/formulas.md §2-3 (sentence segments, one change point) has several segments to work with.
Every value along the chain (start, operands, intermediate results, answer) is an integer in
[0, ``MAX_VALUE``]; subtraction never goes below 0 and multiplication never goes above ``MAX_VALUE``,
which keeps the task learnable by the tiny shipped models.

Both the teacher and the student see exactly :func:`format_prompt` (``"Q: <problem>\\nA:"``) and are
trained to continue it with ``" " + solution`` followed by the EOS token.

Train and eval problems are disjoint *by content*, not only by seed: each problem belongs to the
``"train"`` or the ``"eval"`` split according to a stable CRC32 hash of its text (1 in
``EVAL_FRACTION_DENOM`` problems is an eval problem), and :func:`make_problems` only returns problems
of the split asked for. Use ``TRAIN_SEED`` / ``EVAL_SEED`` (or any two seeds) with the matching split.
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Union

from fastopd.train.runlog import json_line, read_jsonl

__all__ = [
    "MAX_VALUE",
    "MAX_ADD",
    "MAX_MUL",
    "MIN_STEPS",
    "MAX_STEPS",
    "SENTENCES",
    "TRAIN_SEED",
    "EVAL_SEED",
    "DEMO_VERIFIER",
    "make_problems",
    "make_problem",
    "format_prompt",
    "solution_completion",
    "split_of",
    "evaluate_steps",
    "write_jsonl",
    "read_jsonl",
    "demo_asset_paths",
    "DemoAssets",
]

MAX_VALUE = 99
"""Largest value allowed anywhere in a chain (start, operands, intermediate results, answer)."""
MAX_START = 20
"""Start values are drawn from 1..MAX_START."""
MAX_ADD = 9
"""Add/subtract operands are drawn from 1..MAX_ADD."""
MAX_MUL = 5
"""Multiply operands are drawn from 2..MAX_MUL."""
MIN_STEPS = 2
"""Fewest operations in a chain (the default of :func:`make_problems`)."""
MAX_STEPS = 5
"""Most operations in a chain (the default of :func:`make_problems`)."""
SENTENCES = (MIN_STEPS + 2, MAX_STEPS + 2)
"""Sentences in the shortest and the longest solution: the start, one per operation, the answer."""
EVAL_FRACTION_DENOM = 8
"""1 in EVAL_FRACTION_DENOM problems (by CRC32 of the problem text) belongs to the eval split."""
TRAIN_SEED = 0
"""Seed the demo build uses for training problems (split "train")."""
EVAL_SEED = 1234
"""Seed the demo build and the tests use for held-out problems (split "eval")."""
DEMO_VERIFIER = "boxed"
"""Name (for :func:`fastopd.train.verify.get_verifier`) of the verifier that grades this task."""

_SPLITS = ("train", "eval")


def format_prompt(problem_text: str) -> str:
    """The exact, chat-free prompt both demo models were trained on: ``"Q: <problem_text>\\nA:"``.

    The completion the models produce starts with a space (``" We start with ..."``), so tokenising
    the prompt and the completion separately gives the same ids as tokenising their concatenation.
    """
    if not isinstance(problem_text, str):
        raise TypeError(f"problem_text must be a str, got {type(problem_text).__name__}")
    return f"Q: {problem_text}\nA:"


def solution_completion(problem: Dict[str, str]) -> str:
    """The SFT target that follows :func:`format_prompt`: ``" " + problem["solution"]`` (EOS not included)."""
    return " " + problem["solution"]


def split_of(problem_text: str) -> str:
    """``"eval"`` if CRC32(problem_text) % EVAL_FRACTION_DENOM == 0, else ``"train"`` (stable across runs)."""
    return "eval" if zlib.crc32(problem_text.encode("utf-8")) % EVAL_FRACTION_DENOM == 0 else "train"


def _feasible_ops(value: int) -> List[str]:
    ops = []
    if value < MAX_VALUE:
        ops.append("add")
    if value > 0:
        ops.append("sub")
    if value >= 1 and value * 2 <= MAX_VALUE:
        ops.append("mul")
    return ops


def _apply(op: str, value: int, k: int) -> int:
    if op == "add":
        return value + k
    if op == "sub":
        return value - k
    if op == "mul":
        return value * k
    raise ValueError(f"unknown op {op!r}")


_PROMPT_STEP = {"add": "Add {k}.", "sub": "Subtract {k}.", "mul": "Multiply by {k}."}
_SOLUTION_STEP = {"add": "Adding {k} gives {v}.", "sub": "Subtracting {k} gives {v}.",
                  "mul": "Multiplying by {k} gives {v}."}


def make_problem(rng: random.Random, n_steps: int) -> Dict[str, str]:
    """One problem with exactly ``n_steps`` operations drawn from ``rng``.

    Returns ``{"prompt": problem text (not yet wrapped by format_prompt), "answer": "<int>",
    "solution": multi-sentence solution ending in "The answer is \\boxed{<int>}."}``.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    value = rng.randint(1, MAX_START)
    prompt = [f"Start with {value}."]
    solution = [f"We start with {value}."]
    for _ in range(n_steps):
        op = rng.choice(_feasible_ops(value))
        if op == "add":
            k = rng.randint(1, min(MAX_ADD, MAX_VALUE - value))
        elif op == "sub":
            k = rng.randint(1, min(MAX_ADD, value))
        else:
            k = rng.randint(2, min(MAX_MUL, MAX_VALUE // value))
        value = _apply(op, value, k)
        prompt.append(_PROMPT_STEP[op].format(k=k))
        solution.append(_SOLUTION_STEP[op].format(k=k, v=value))
    prompt.append("What is the result?")
    solution.append(f"The answer is \\boxed{{{value}}}.")
    return {"prompt": " ".join(prompt), "answer": str(value), "solution": " ".join(solution)}


def make_problems(n: int, seed: int, min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS,
                  split: str = "train", unique: bool = True) -> List[Dict[str, str]]:
    """``n`` problems of the given ``split``, deterministic given ``(seed, min_steps, max_steps, split)``.

    The number of steps is uniform in ``[min_steps, max_steps]``. Problems whose text hashes to the
    other split are skipped (see :func:`split_of`), so a "train" list and an "eval" list never share a
    problem whatever their seeds. With ``unique=True`` (default) no problem repeats within the list.

    Returns a list of ``{"prompt", "answer", "solution"}`` dicts; ``prompt`` is the bare problem text,
    wrap it with :func:`format_prompt` before feeding a model.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(min_steps, int) or not isinstance(max_steps, int) or not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps (ints), got min_steps={min_steps!r}, "
                         f"max_steps={max_steps!r}")
    rng = random.Random(f"fastopd-task/{seed}/{min_steps}/{max_steps}/{split}")
    return draw_problems(n, lambda: make_problem(rng, rng.randint(min_steps, max_steps)), split, unique,
                         what=f"with {min_steps}-{max_steps} steps")


def draw_problems(n: int, draw, split: str, unique: bool = True, what: str = "") -> List[Dict[str, str]]:
    """The first ``n`` problems from ``draw()`` that hash to ``split`` (:func:`split_of`), distinct by prompt
    when ``unique``; shared by every task's ``make_problems``. Gives up with a RuntimeError after
    100 n + 10,000 draws (too few distinct problems exist)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    out: List[Dict[str, str]] = []
    seen = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise RuntimeError(f"could not draw {n} distinct {split!r} problems{' ' + what if what else ''}; "
                               "ask for fewer or pass unique=False")
        p = draw()
        if split_of(p["prompt"]) != split:
            continue
        if unique:
            if p["prompt"] in seen:
                continue
            seen.add(p["prompt"])
        out.append(p)
    return out


def evaluate_steps(problem_text: str) -> int:
    """Independently re-evaluate a problem text ("Start with a. Add k. ... What is the result?").

    Parses the sentences and applies them; used by tests and as a sanity check of the answers.
    """
    sentences = [s.strip() for s in problem_text.split(".") if s.strip()]
    first = sentences[0]
    if not first.startswith("Start with "):
        raise ValueError(f"problem_text must start with 'Start with <n>.', got {problem_text!r}")
    value = int(first[len("Start with "):])
    for s in sentences[1:]:
        if s.startswith("What is the result"):
            break
        if s.startswith("Add "):
            value = value + int(s[4:])
        elif s.startswith("Subtract "):
            value = value - int(s[9:])
        elif s.startswith("Multiply by "):
            value = value * int(s[12:])
        else:
            raise ValueError(f"unknown step {s!r} in {problem_text!r}")
    return value


def write_jsonl(path: Union[str, Path], problems: Iterable[Dict[str, str]], *, formatted: bool = True,
                with_solution: bool = False) -> Path:
    """Write one JSON object per line with ``prompt`` and ``answer`` (the trainer's input format).

    With ``formatted=True`` (default) ``prompt`` is already wrapped by :func:`format_prompt`, i.e. it is
    exactly the text to feed the model. ``with_solution=True`` also writes the reference ``solution``.
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            row = {"prompt": format_prompt(p["prompt"]) if formatted else p["prompt"], "answer": p["answer"]}
            if with_solution:
                row["solution"] = p["solution"]
            f.write(json_line(row, ensure_ascii=False) + "\n")
    return path


class DemoAssets(dict):
    """``dict`` with keys ``teacher``, ``student``, ``tokenizer`` (local folders) plus attribute access."""

    def __getattr__(self, name: str) -> Path:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def demo_asset_paths(folder: str = "demo") -> DemoAssets:
    """Local folders of the shipped demo models, for ``AutoModelForCausalLM/AutoTokenizer.from_pretrained``.

    Returns ``DemoAssets(teacher=Path, student=Path, tokenizer=Path, root=Path)``. The teacher and
    student folders also hold a copy of the tokenizer. The folders may be missing in a source checkout
    where ``scripts/build_demo_assets.py`` has not been run; check ``path.exists()``. The environment variable
    ``FASTOPD_DEMO_ASSETS`` points the demo at another folder of the same layout. ``folder``: which shipped
    folder under ``fastopd/assets`` (``"demo"``; ``"demo_check"``: the check task's models, built by
    ``scripts/build_demo_assets.py --task check``; the environment variable applies to ``"demo"`` only).
    The weights are stored in bf16 but ``config.json`` says ``dtype: float32``, so a plain
    ``from_pretrained(path)`` gives an fp32 model (pass ``dtype=torch.bfloat16`` for half precision).
    """
    import os

    # FASTOPD_DEMO_ASSETS: another folder of the same layout (e.g. a rebuild in progress)
    if not isinstance(folder, str) or not folder or "/" in folder or folder.startswith("."):
        raise ValueError(f"folder must be the name of a folder under fastopd/assets, got {folder!r}")
    env = os.environ.get("FASTOPD_DEMO_ASSETS") if folder == "demo" else None
    root = Path(env or Path(__file__).resolve().parent.parent / "assets" / folder)
    return DemoAssets(teacher=root / "teacher", student=root / "student", tokenizer=root / "tokenizer", root=root)
