"""The four synthetic problem families.

Each family is a function ``rng -> (question, answer, final)``. Answers are short
worked solutions (16-64 characters, i.e. 16-64 tokens for the character-level
tokenizer) whose last line is ``#### <final>``. Every family produces several
output tokens that depend on each other (carries, order, positions, partial
results), which is what makes parallel decoding of them non-trivial.

All randomness comes from the ``random.Random`` passed in, so a family is a pure
function of the generator state.
"""

from __future__ import annotations

import random
from typing import Callable

FINAL_MARKER = "#### "

Generated = tuple[str, str, str]  # (question, answer, final)


def _with_final(work: str, final: str) -> str:
    return f"{work}\n{FINAL_MARKER}{final}" if work else f"{FINAL_MARKER}{final}"


def gen_add(rng: random.Random) -> Generated:
    """Column addition of two 3-4 digit numbers, carries written out.

    One step per column, right to left: ``a+b=s`` or ``a+b+1=s`` when a carry
    comes in; ``s`` holds the result digit and the outgoing carry. The shorter
    operand is padded with 0 so every step has the same shape. Answers are
    26-44 characters (the worst case is 9999+9999).
    """
    da, db = rng.randint(3, 4), rng.randint(3, 4)
    a = rng.randint(10 ** (da - 1), 10**da - 1)
    b = rng.randint(10 ** (db - 1), 10**db - 1)
    xs, ys = str(a)[::-1], str(b)[::-1]
    width = max(len(xs), len(ys))
    xs, ys = xs.ljust(width, "0"), ys.ljust(width, "0")
    steps, carry = [], 0
    for x, y in zip(xs, ys):
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    final = str(a + b)
    return f"add {a}+{b}", _with_final(",".join(steps), final), final


def gen_sort(rng: random.Random) -> Generated:
    """Sort 5-8 two-digit numbers (10..99) ascending, duplicates kept (answers of 19-28 characters)."""
    xs = [rng.randint(10, 99) for _ in range(rng.randint(5, 8))]
    final = ",".join(map(str, sorted(xs)))
    return "sort " + ",".join(map(str, xs)), _with_final("", final), final


def gen_reverse(rng: random.Random) -> Generated:
    """Reverse a string of 11-20 lowercase letters (answers of 16-25 characters)."""
    s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(11, 20)))
    final = s[::-1]
    return f"reverse {s}", _with_final("", final), final


# Expression trees: a leaf is an int, a node is (op, left, right).
_PREC = {"+": 1, "-": 1, "*": 2}


def _random_tree(rng: random.Random, n_ops: int):
    if n_ops == 0:
        return rng.randint(1, 9)
    n_left = rng.randint(0, n_ops - 1)
    return (rng.choice("+-*"), _random_tree(rng, n_left), _random_tree(rng, n_ops - 1 - n_left))


def _render(tree) -> str:
    # Minimal parentheses, except that an equal-precedence right child keeps its
    # parentheses: "2*(3*4)" stays as written so that the worked steps (which
    # follow the tree) match the usual left-to-right reading.
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    ls, rs = _render(left), _render(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if not isinstance(right, int) and _PREC[right[0]] <= _PREC[op]:
        rs = f"({rs})"
    return f"{ls}{op}{rs}"


def _evaluate(tree, steps: list[str]) -> int:
    """Post-order evaluation, left subtree first; records one step per operator."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = _evaluate(left, steps), _evaluate(right, steps)
    r = a + b if op == "+" else a - b if op == "-" else a * b
    steps.append(f"{a}{op}{b}={r}")
    return r


def gen_expr(rng: random.Random) -> Generated:
    """Evaluate a 2-3 operator expression over digits 1..9 with + - * and parentheses.

    Steps are the operators in evaluation order (``3+4=7,7*2=14,14-5=9``).
    Expressions with a negative intermediate result, or whose answer falls
    outside 16-64 characters, are redrawn (rejection keeps it deterministic).
    """
    while True:
        tree = _random_tree(rng, rng.randint(2, 3))
        steps: list[str] = []
        value = _evaluate(tree, steps)
        if any("=-" in s for s in steps):
            continue
        answer = _with_final(",".join(steps), str(value))
        if 16 <= len(answer) <= 64:
            return f"eval {_render(tree)}", answer, str(value)


FAMILIES: dict[str, Callable[[random.Random], Generated]] = {
    "add": gen_add,
    "sort": gen_sort,
    "reverse": gen_reverse,
    "expr": gen_expr,
}
