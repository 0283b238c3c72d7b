"""Training of the embedded default models (masked-diffusion objective, curriculum, resumable loop) and of
the embedded guide (causal-LM objective, guide.py)."""

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
from .causal_objective import causal_lm_loss, loss_mask, shot_answer_mask
from .guide import GuideConfig, GuideTrainer, build_guide, export_guide, guide_curriculum
from .objective import diffusion_loss, sample_noise, weighted_masked_loss
from .trainer import TrainConfig, Trainer, init_weights, lr_at

__all__ = [
    "DEFAULT_CURRICULUM",
    "Batch",
    "BatchKind",
    "BatchSampler",
    "GuideConfig",
    "GuideTrainer",
    "Phase",
    "TrainConfig",
    "Trainer",
    "build_guide",
    "causal_lm_loss",
    "default_curriculum",
    "diffusion_loss",
    "encode",
    "export_guide",
    "guide_curriculum",
    "init_weights",
    "loss_mask",
    "lr_at",
    "make_batch",
    "sample_noise",
    "shot_answer_mask",
    "weighted_masked_loss",
]
