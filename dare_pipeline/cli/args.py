"""argparse value types whose errors name the flag (argparse adds "argument --flag:" and exits 2)."""

from __future__ import annotations

import argparse


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
