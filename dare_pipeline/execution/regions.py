"""Compile regions: code that repeats in every layer is compiled once and stamped out for the rest.

A step forward runs the same sub-operations (projections, attention, the SwiGLU block) in every
layer with different weights. Marked as nested compile regions (`torch.compiler.nested_compile_region`),
they are traced and code-generated once per input shape and reused by every layer, while the step
forward stays one graph, so a CUDA-graph replay still covers the whole step. Compiling a forward
then costs about one layer's code generation instead of one per layer (docs/benchmarks.md,
"Compile time"). Outside torch.compile a region is a plain call: eager numbers are unchanged.

Regions are a young torch feature. `execution.regions: false` compiles every layer inline, and
the executor falls back to that by itself when a compile with regions fails (see executor.py).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_nested_compile_region = getattr(torch.compiler, "nested_compile_region", None)
AVAILABLE = _nested_compile_region is not None
_enabled = True  # read while tracing: torch.compile guards on it, so each setting keeps its own graphs


def compile_region(function):
    """`function` as a nested compile region when compiling with regions on; a plain call otherwise."""
    if not AVAILABLE:
        return function
    region = _nested_compile_region(function)

    @functools.wraps(function)
    def call(*args, **kwargs):
        if _enabled and torch.compiler.is_compiling():
            return region(*args, **kwargs)
        return function(*args, **kwargs)

    return call


@contextlib.contextmanager
def regions(enabled: bool):
    """Trace (and run) compiled forwards with regions on or off."""
    global _enabled
    previous, _enabled = _enabled, enabled and AVAILABLE
    try:
        yield
    finally:
        _enabled = previous
