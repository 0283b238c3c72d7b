"""Native LLaDA and Dream models."""

from .config import ModelConfig
from .loader import CheckpointError, load_model
from .transformer import DiffusionTransformer

__all__ = ["CheckpointError", "DiffusionTransformer", "ModelConfig", "load_model"]
