"""argparse value types whose errors name the flag (argparse adds "argument --flag:" and exits 2)."""

from __future__ import annotations

import argparse
import math
import os


def positive_int(text: str) -> int:
    """A count of at least 1 (torch threads, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= 1")
    return value


def token_ids(text: str) -> list[int]:
    """A prompt as comma-separated non-negative token ids: '1,2,3'."""
    parts = [p.strip() for p in text.split(",")]
    if parts and not parts[-1]:
        parts.pop()  # a trailing comma
    if not parts or any(not p.isdigit() for p in parts):
        bad = next((p for p in parts if not p.isdigit()), "")
        raise argparse.ArgumentTypeError(f"{text!r}: {bad!r} is not a token id; expected comma-separated "
                                         f"non-negative integers such as 1,2,3")
    return [int(p) for p in parts]


def thread_count(text: str) -> int:
    """torch CPU threads: 1 to 4 x this machine's CPUs (OpenMP crashes on some huge counts, and more
    threads than CPUs only wait for each other)."""
    value = positive_int(text)
    cores = os.cpu_count() or 1
    if value > 4 * cores:
        raise argparse.ArgumentTypeError(f"{value} is more than 4 x this machine's {cores} CPUs; expected 1 to "
                                         f"{4 * cores}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a tolerance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; expected a finite number >= 0")
    return value


class ChatFlag(argparse.BooleanOptionalAction):
    """--chat / --no-chat, of which one may be given: together they contradict each other."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = not option_string.startswith("--no-")
        if getattr(namespace, self.dest, None) not in (None, value):
            parser.error("--chat and --no-chat exclude each other; give one")
        setattr(namespace, self.dest, value)
