"""attrs validators for plugin options, the ones every built-in plugin uses.

A plugin's `Options` is an attrs class; a validator that raises ValueError makes the recipe loader
report a ConfigError naming the file, the key path, the value and what is allowed, exactly as for
a built-in plugin:

    @attrs.frozen(kw_only=True)
    class MyOptions:
        threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
        budget: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1.0)))
        mode: str = attrs.field(default="fast", validator=choice("fast", "exact"))
        exempt_layers: tuple[int, ...] = attrs.field(default=(), validator=layer_indices)

This module is the stable import path for them (their implementations live with the loader).
"""

from __future__ import annotations

from ..reuse.drift import layer_indices
from .loading import ConfigError, at_least, choice, in_range

__all__ = ["ConfigError", "at_least", "choice", "in_range", "layer_indices"]
