"""Configuration: recipes (a model, generation and execution settings, a stack of plugins) loaded
from YAML into attrs classes and validated, keyword overrides, and the validators plugins use for
their own options. Every error names the file, the key path, the bad value and what is allowed.

A plugin's `Options` is an attrs class; a validator that raises ValueError makes the recipe loader
report a ConfigError naming the file, the key path, the value and what is allowed, exactly as for
a built-in plugin:

    from dare_pipeline.config import at_least, choice, in_range, layer_indices

    @attrs.frozen(kw_only=True)
    class MyOptions:
        threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
        budget: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1.0)))
        mode: str = attrs.field(default="fast", validator=choice("fast", "exact"))
        exempt_layers: tuple[int, ...] = attrs.field(default=(), validator=layer_indices)
"""

from .execution import MODES, ExecutionConfig
from .loading import ConfigError, at_least, choice, in_range, layer_indices
from .recipe import GenerationConfig, PluginSpec, Recipe

__all__ = ["MODES", "ConfigError", "ExecutionConfig", "GenerationConfig", "PluginSpec", "Recipe", "at_least",
           "choice", "in_range", "layer_indices"]
