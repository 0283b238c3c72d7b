"""What `dare-pipeline plugins` says about a plugin: a one-line description and its conflicts."""

from __future__ import annotations

import sys


def description(cls) -> str:
    """The first line of the plugin class's own docstring, else of its module's; "" without either."""
    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else ""


def conflicts(name: str, classes: dict) -> dict[str, str]:
    """Plugins `name` cannot be combined with and why: those it declares and those that declare it."""
    found = dict(classes[name].conflicts)
    for other, cls in sorted(classes.items()):
        if name in cls.conflicts and other not in found:
            found[other] = cls.conflicts[name]
    return found
