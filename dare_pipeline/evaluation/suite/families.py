"""The four synthetic problem families.

Each family is a function ``rng -> (question, answer, final)``. Answers are short
worked solutions (16-64 characters, i.e. 16-64 tokens for the character-level
tokenizer) whose last line is ``#### <final>``. Every family produces several
output tokens that depend on each other (running results, order, positions),
which is what makes parallel decoding of them non-trivial.

Items within a question are distinct (digits, letters): each output token can then be found from
its neighbours by content ("the letter before the one just written", "the operand after the one
just used"), which a small model learns in minutes. Repeated items make those lookups ambiguous
and need position arithmetic instead, which a CPU-sized training budget did not teach.

All randomness comes from the ``random.Random`` passed in, so a family is a pure
function of the generator state.
"""

from __future__ import annotations

import random
from collections.abc import Callable

FINAL_MARKER = "#### "

Generated = tuple[str, str, str]  # (question, answer, final)


def _with_final(work: str, final: str) -> str:
    return f"{work}\n{FINAL_MARKER}{final}" if work else f"{FINAL_MARKER}{final}"


def _chain(first: int, ops_and_operands: list[tuple[str, int]]) -> tuple[list[str], int]:
    """Left-to-right evaluation with one worked step per operator: ``a+b=c,c-d=e,...``."""
    steps, value = [], first
    for op, x in ops_and_operands:
        result = value + x if op == "+" else value - x
        steps.append(f"{value}{op}{x}={result}")
        value = result
    return steps, value


def gen_add(rng: random.Random) -> Generated:
    """Add 4-7 distinct digits (1..9) with the running sum written out: ``7+3=10,10+9=19,...``.

    Each step adds the next operand to the previous step's result, so the output tokens depend on
    each other. The operands are distinct so that "the operand after the one used in the previous
    step" names one place in the question (answers of 26-64 characters).
    """
    digits = rng.sample(range(1, 10), rng.randint(4, 7))
    steps, value = _chain(digits[0], [("+", d) for d in digits[1:]])
    return "add " + "+".join(map(str, digits)), _with_final(",".join(steps), str(value)), str(value)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def gen_sort(rng: random.Random) -> Generated:
    """Sort 8-13 distinct lowercase letters alphabetically (answers of 20-30 characters)."""
    letters = rng.sample(_LETTERS, rng.randint(8, 13))
    final = ",".join(sorted(letters))
    return "sort " + ",".join(letters), _with_final("", final), final


def gen_reverse(rng: random.Random) -> Generated:
    """Reverse a string of 11-20 distinct lowercase letters (answers of 16-25 characters)."""
    s = "".join(rng.sample(_LETTERS, rng.randint(11, 20)))
    final = s[::-1]
    return f"reverse {s}", _with_final("", final), final


def gen_expr(rng: random.Random) -> Generated:
    """Evaluate a chain of 3-5 additions and subtractions over distinct digits, left to right.

    ``eval 9-3+7-2`` -> ``9-3=6,6+7=13,13-2=11`` then ``#### 11``. Chains with a negative
    intermediate result are redrawn (rejection keeps the stream deterministic). Answers of
    20-53 characters.
    """
    while True:
        digits = rng.sample(range(1, 10), rng.randint(4, 6))
        ops = [rng.choice("+-") for _ in digits[1:]]
        steps, value = _chain(digits[0], list(zip(ops, digits[1:])))
        if any("=-" in s for s in steps):
            continue
        question = "eval " + str(digits[0]) + "".join(f"{op}{d}" for op, d in zip(ops, digits[1:]))
        return question, _with_final(",".join(steps), str(value)), str(value)


FAMILIES: dict[str, Callable[[random.Random], Generated]] = {
    "add": gen_add,
    "sort": gen_sort,
    "reverse": gen_reverse,
    "expr": gen_expr,
}
