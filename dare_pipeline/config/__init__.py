"""Configuration: recipes (a model, generation and execution settings, a stack of plugins) loaded
from YAML into attrs classes and validated, keyword overrides, and the validators plugins use for
their own options. Every error names the file, the key path, the bad value and what is allowed.

    from dare_pipeline.config import ConfigError, at_least, choice, in_range, layer_indices
"""

from .execution import MODES, ExecutionConfig
from .recipe import GenerationConfig, PluginSpec, Recipe
from .validators import ConfigError, at_least, choice, in_range, layer_indices

__all__ = ["MODES", "ConfigError", "ExecutionConfig", "GenerationConfig", "PluginSpec", "Recipe", "at_least",
           "choice", "in_range", "layer_indices"]
