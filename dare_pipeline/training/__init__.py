"""Training of the embedded default models (masked-diffusion objective, curriculum, resumable loop)."""

from .batches import (
    DEFAULT_CURRICULUM,
    Batch,
    BatchKind,
    BatchSampler,
    Phase,
    default_curriculum,
    encode,
    make_batch,
)
from .objective import diffusion_loss, sample_noise, weighted_masked_loss
from .trainer import TrainConfig, Trainer, init_weights, lr_at

__all__ = [
    "DEFAULT_CURRICULUM",
    "Batch",
    "BatchKind",
    "BatchSampler",
    "Phase",
    "TrainConfig",
    "Trainer",
    "default_curriculum",
    "diffusion_loss",
    "encode",
    "init_weights",
    "lr_at",
    "make_batch",
    "sample_noise",
    "weighted_masked_loss",
]
