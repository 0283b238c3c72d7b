"""Training of the embedded guide: a small causal LM (transformers' LlamaForCausalLM, built from a
config) with the embedded diffusion model's character tokenizer, on the same task suite.

Guided decoding lets an autoregressive model check the diffusion model's draft of a block in one
teacher-forced forward; the guide must read the diffusion model's prompts and canvases exactly, so
it is trained on the diffusion model's batches (`batches.BatchSampler`: train split only, held-out
questions excluded by construction, left-padded prompts, EOS tails) with the causal objective of
`causal_objective.py`.

The run stops at `steps` or after `minutes` of training time over all its sessions, whichever comes
first. The schedule's clock is the step when `steps` is given, else the training time: with a
wall-clock budget alone the learning rate decays, and the curriculum moves on, as a fraction of the
budget, so the run always ends decayed however fast the machine turns out to be (a resumed run
then draws the batches of an uninterrupted one up to the clock's rounding; with `steps` exactly).

Layout of an output directory:
    checkpoint.pt      model + optimizer + step + clock + sampler/RNG states (what a resume reads)
    model/             the latest weights as an HF-format directory with the tokenizer files
    train_log.jsonl    one line per logged step: step, loss, targets, lr, elapsed, ...
    train_config.json  the run's configuration
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import attrs
import torch

from ..config.loading import at_least, choice, in_range
from ..models.tokenizer import BOS_ID, EOS_ID, EOT_ID, PAD_ID, VOCAB_SIZE
from .batches import BatchKind, BatchSampler, Phase
from .causal_objective import causal_lm_loss, loss_mask
from .optimizers import OPTIMIZERS, build_optimizer, optimizer_step
from .run_dir import CHECKPOINT, LOG, atomic_torch_save, truncate_log
from .trainer import SCHEDULES, check_family_weights

# the sampler picks phases by a step out of a total; a clock's progress p is handed over as
# round(p * PHASE_RESOLUTION) out of PHASE_RESOLUTION
PHASE_RESOLUTION = 100_000
# the architecture fields a checkpoint must match to be resumed
ARCHITECTURE = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings", "optimizer")


def guide_curriculum(short_phase: float = 0.2, group_by_length: int = 256) -> tuple[Phase, ...]:
    """Zero-shot and short prompts first (the algorithms, cheaply), then mostly held-out-like
    few-shot prompts (3-8 shots, up to 512 characters; with shot answers in the loss each row carries
    ~6 answers) and a share of 128/256 canvases, whose long EOS tails guided decoding checks too."""
    if not 0.0 <= short_phase < 1.0:
        raise ValueError(f"short_phase must be in [0, 1), got {short_phase!r}")
    return (
        Phase(short_phase, (BatchKind("zero_shot", 0.6, max_shots=0, group_by_length=group_by_length),
                            BatchKind("short", 0.4, max_shots=2))),
        Phase(1.0, (BatchKind("zero_shot", 0.15, max_shots=0, group_by_length=group_by_length),
                    BatchKind("fewshot", 0.7, max_shots=8, max_prompt_chars=512, min_shots=3),
                    BatchKind("long_canvas", 0.15, max_shots=8, max_prompt_chars=512, min_shots=2,
                              canvases=(128, 256)))),
    )


def _optional_positive(instance, attribute, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, got {value!r}")


@attrs.define
class GuideConfig:
    # architecture (LlamaForCausalLM): 0.55 M parameters by default, a quarter of the embedded
    # diffusion model's FLOPs per token (docs in the training script)
    d_model: int = attrs.field(default=128, validator=at_least(1))
    n_layers: int = attrs.field(default=4, validator=at_least(1))
    n_heads: int = attrs.field(default=4, validator=at_least(1))
    n_kv_heads: int = attrs.field(default=2, validator=at_least(1))
    ffn_hidden: int = attrs.field(default=224, validator=at_least(1))
    tie_embeddings: bool = True
    max_position_embeddings: int = attrs.field(default=2048, validator=at_least(1))
    rope_theta: float = 10000.0
    # length of the run: `steps` (schedule over steps) and/or `minutes` of training time (the
    # schedule over time when steps is None); both given: whichever ends first
    steps: int | None = attrs.field(default=None, validator=_optional_positive)
    minutes: float | None = attrs.field(default=None, validator=_optional_positive)
    lr: float = attrs.field(default=1.5e-3, validator=at_least(0.0, strict=True))
    min_lr_ratio: float = attrs.field(default=0.05, validator=in_range(0.0, 1.0))
    warmup_steps: int = attrs.field(default=100, validator=at_least(1))
    schedule: str = attrs.field(default="wsd", validator=choice(*SCHEDULES))
    decay_fraction: float = attrs.field(default=0.2, validator=[at_least(0.0, strict=True), in_range(0.0, 1.0)])
    optimizer: str = attrs.field(default="muon", validator=choice(*OPTIMIZERS))
    muon_lr_scale: float = attrs.field(default=1.0, validator=at_least(0.0, strict=True))
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    token_budget: int = attrs.field(default=3072, validator=at_least(1))
    max_rows: int = attrs.field(default=64, validator=at_least(1))
    short_phase: float = attrs.field(default=0.2, validator=in_range(0.0, 1.0, include_high=False))
    group_by_length: int = attrs.field(default=256, validator=at_least(0))
    family_weights: dict[str, int] | None = attrs.field(default=None, validator=check_family_weights)
    shot_answers: bool = True  # the few-shot answers inside prompts are targets too (causal_objective.py)
    init_std: float = 0.02
    seed: int = 0
    log_every: int = attrs.field(default=10, validator=at_least(1))
    checkpoint_every: int = attrs.field(default=100, validator=at_least(1))

    def __attrs_post_init__(self):
        if self.steps is None and self.minutes is None:
            raise ValueError("a guide run needs steps or minutes (or both): neither was given")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"d_model {self.d_model} must divide by n_heads {self.n_heads}, and n_heads by "
                             f"n_kv_heads {self.n_kv_heads}")

    def model_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.d_model, intermediate_size=self.ffn_hidden,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            rms_norm_eps=1e-5, tie_word_embeddings=self.tie_embeddings, initializer_range=self.init_std,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, attention_bias=False, mlp_bias=False,
        )

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, raw: dict, **overrides) -> GuideConfig:
        raw = {**raw, **overrides}
        raw["betas"] = tuple(raw["betas"])
        return cls(**raw)


def build_guide(cfg: GuideConfig):
    """A freshly initialised LlamaForCausalLM of the config's shape (normal(0, init_std) weights, seeded)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(cfg.model_config())
    model.generation_config.eos_token_id = [EOS_ID, EOT_ID]  # the tokenizer's stop ids, as the pipeline's
    model.generation_config.pad_token_id = PAD_ID
    return model


def schedule_factor(progress: float, cfg: GuideConfig) -> float:
    """The learning rate as a fraction of the peak at `progress` (0..1) of the run, warmup aside."""
    p = min(1.0, max(0.0, progress))
    if cfg.schedule == "wsd":
        decay_start = 1.0 - cfg.decay_fraction
        return 1.0 if p < decay_start else 1.0 - (1.0 - cfg.min_lr_ratio) * (p - decay_start) / cfg.decay_fraction
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def lr_at(step: int, progress: float, cfg: GuideConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * schedule_factor(progress, cfg)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_guide(model, directory: str | os.PathLike) -> Path:
    """Write `model` as an HF-format directory with the embedded diffusion model's tokenizer files,
    atomically (a temporary sibling is filled, then renamed over `directory`). The files are copied,
    not written again: a tokenizer saved by another transformers/tokenizers version serialises
    differently, and the guide's tokenizer must be the diffusion model's byte for byte."""
    from ..models.default import EMBEDDED
    from ..models.saving import atomic_directory

    directory = Path(directory)
    was_training = model.training
    model.eval()
    try:
        with atomic_directory(directory) as tmp:
            model.save_pretrained(str(tmp))
            for name in TOKENIZER_FILES:
                shutil.copyfile(EMBEDDED["default"] / name, Path(tmp) / name)
    finally:
        model.train(was_training)
    return directory


class GuideTrainer:
    def __init__(self, cfg: GuideConfig, out_dir: str | os.PathLike, curriculum: tuple[Phase, ...] | None = None,
                 progress: bool = True):
        self.cfg, self.out = cfg, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress_bar = progress
        self.model = build_guide(cfg)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas,
                                         cfg.muon_lr_scale)
        curriculum = curriculum or guide_curriculum(cfg.short_phase, cfg.group_by_length)
        self.sampler = BatchSampler(cfg.seed, curriculum, token_budget=cfg.token_budget, max_rows=cfg.max_rows,
                                    family_weights=cfg.family_weights)
        self.step = 0
        self.tokens = 0  # real (unpadded) tokens read
        self.targets = 0  # tokens the loss covered
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.last_loss: float | None = None
        self._last_info: dict = {}

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ---- the clock -----------------------------------------------------------------------------
    def progress(self) -> float:
        """Fraction of the run done: by steps when the config has steps, else by training time."""
        if self.cfg.steps is not None:
            return min(1.0, self.step / self.cfg.steps)
        return min(1.0, self.elapsed / (60.0 * self.cfg.minutes))

    def finished(self) -> bool:
        cfg = self.cfg
        by_steps = cfg.steps is not None and self.step >= cfg.steps
        by_time = cfg.minutes is not None and self.elapsed >= 60.0 * cfg.minutes
        return by_steps or by_time

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "guide_config": self.cfg.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "targets": self.targets,
            "elapsed": self.elapsed,
            "last_loss": self.last_loss,
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def save(self, export: bool = True) -> None:
        atomic_torch_save(self.state_dict(), self.out / CHECKPOINT)
        if export:
            export_guide(self.model, self.out / "model")

    def load(self, path: str | os.PathLike | None = None) -> None:
        path = Path(path or self.out / CHECKPOINT)
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["guide_config"]
        for field in ARCHITECTURE:
            if saved[field] != getattr(self.cfg, field):
                raise ValueError(f"{path}: the checkpoint was trained with {field}={saved[field]!r}, "
                                 f"this run has {getattr(self.cfg, field)!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens, self.targets = state["step"], state["tokens"], state["targets"]
        self.elapsed, self.last_loss = state["elapsed"], state["last_loss"]
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        truncate_log(self.out / LOG, self.step)

    # ---- training ------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        progress = self.progress()
        batch = self.sampler.next_batch(round(progress * PHASE_RESOLUTION), PHASE_RESOLUTION)
        lr = lr_at(self.step, progress, cfg)
        targets = loss_mask(batch.input_ids, batch.attention_mask, batch.answer_mask, cfg.shot_answers)
        loss, n_targets = causal_lm_loss(self.model, batch.input_ids, batch.attention_mask, targets)
        grad_norm = optimizer_step(self.model, self.optimizer, loss, lr, cfg.grad_clip)
        self.step += 1
        self.tokens += batch.real_tokens
        self.targets += n_targets
        self.last_loss = loss.item()
        self._last_info = {"lr": lr, "progress": round(progress, 5), "grad_norm": grad_norm,
                           "rows": batch.rows, "canvas": batch.canvas, "kind": batch.kind,
                           "width": batch.input_ids.shape[1], "batch_targets": n_targets}
        return self.last_loss

    def run(self, max_steps: int | None = None) -> bool:
        """Train until the run is finished (steps or minutes of the config) or `max_steps` more steps
        of this session, checkpointing every cfg.checkpoint_every steps and at the end (also when
        interrupted). Returns True when the run is finished."""
        from tqdm import tqdm

        cfg = self.cfg
        stop_at = None if max_steps is None else self.step + max_steps
        bar = tqdm(total=cfg.steps, initial=self.step, file=sys.stderr, disable=not self.progress_bar,
                   dynamic_ncols=True, mininterval=5)
        window, window_n = 0.0, 0
        session_start, elapsed0 = time.monotonic(), self.elapsed
        with (self.out / LOG).open("a") as log:
            try:
                while not self.finished() and (stop_at is None or self.step < stop_at):
                    loss = self.train_step()
                    self.elapsed = elapsed0 + time.monotonic() - session_start
                    window, window_n = window + loss, window_n + 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.finished():
                        rec = {"step": self.step, "loss": round(window / window_n, 5), "last_loss": round(loss, 5),
                               "tokens": self.tokens, "targets": self.targets, "elapsed": round(self.elapsed, 2),
                               **self._last_info}
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{window / window_n:.4f}", lr=f"{self._last_info['lr']:.2e}")
                        window, window_n = 0.0, 0
                    if self.step % cfg.checkpoint_every == 0 and not self.finished():
                        self.save()
            finally:
                bar.close()
                self.save()
        return self.finished()
