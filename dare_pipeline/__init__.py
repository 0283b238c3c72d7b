"""dare-pipeline: training-free acceleration of diffusion language models, every acceleration a plugin."""

from .api import GenerationOutput, Pipeline, generate
from .config.recipe import GenerationConfig, Recipe
from .core.streaming import GenerationStream, PromptStep, StepEvent
from .models import load_model

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "GenerationOutput", "GenerationStream", "Pipeline", "PromptStep", "Recipe", "StepEvent",
           "generate", "load_model"]
