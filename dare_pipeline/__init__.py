"""dare-pipeline: training-free acceleration of diffusion language models, every acceleration a plugin."""

from .api import GenerationOutput, Pipeline, generate
from .models import load_model
from .recipe import GenerationConfig, Recipe

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "GenerationOutput", "Pipeline", "Recipe", "generate", "load_model"]
