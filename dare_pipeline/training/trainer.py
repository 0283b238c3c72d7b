"""The training loop of the embedded default models: AdamW (or Muon + AdamW), warmup + cosine or warmup-stable-decay, gradient
clipping, a JSONL loss log, and periodic resumable checkpoints.

Layout of an output directory:
    checkpoint.pt     model + optimizer + step + sampler/RNG states (what --resume reads)
    model/            the latest weights as an HF-format checkpoint (load_model reads it)
    train_log.jsonl   one line per logged step: step, loss, tokens, lr, elapsed, ...
    train_config.json the run's configuration
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import attrs
import torch

from ..config.loading import at_least, choice, in_range
from ..evaluation.suite import FAMILY_NAMES
from ..models.config import ModelConfig
from ..models.saving import save_checkpoint
from ..models.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE
from ..models.transformer import DiffusionTransformer
from .batches import LONG_PHASE_ZERO_SHOT, BatchSampler, Phase, default_curriculum
from .objective import DEFAULT_EPS, diffusion_loss
from .optimizers import OPTIMIZERS, build_optimizer, optimizer_step
from .run_dir import CHECKPOINT, LOG, atomic_torch_save, truncate_log

# the answer canvas an exported model suggests (generation_config.json): the suite's answers fit in
# 64 tokens (docs/tasks.md), decoded as trained, in blocks of 32, one token per step
SUITE_GENERATION = {"max_new_tokens": 64, "block_length": 32, "steps": 64}


def check_family_weights(instance, attribute, value) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not value:
        raise ValueError(f"family_weights must be a non-empty mapping family -> weight, got {value!r}")
    for family, weight in value.items():
        if family not in FAMILY_NAMES:
            raise ValueError(f"family_weights: unknown family {family!r}; allowed: {', '.join(FAMILY_NAMES)}")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"family_weights[{family!r}] must be a non-negative int, got {weight!r}")
    if not any(value.values()):
        raise ValueError(f"family_weights {value!r} give every family weight 0")


def add_shape_flags(parser) -> None:
    """The training scripts' model-shape flags (--d-model ... --ffn-hidden): config field overrides."""
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)


def stop_on_sigterm(signum, frame):
    """SIGTERM handler of the training scripts: ends training like Ctrl-C, whose finally-block saves a
    checkpoint."""
    raise KeyboardInterrupt(f"signal {signum}")


def family_weights_arg(text: str) -> dict[str, int]:
    """The training scripts' --family-weights: ``expr=3,add=2`` -> {"expr": 3, "add": 2};
    check_family_weights judges the names and values."""
    import argparse

    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected FAMILY=N with N a non-negative integer")
        weights[name.strip()] = int(value)
    return weights


SCHEDULES = ("cosine", "wsd")

# the shipped models' shapes per family (the training script's --family; the throughput benchmark's base)
PRESETS = {
    "llada": {"family": "llada", "d_model": 192, "n_layers": 5, "n_heads": 6, "n_kv_heads": 6, "ffn_hidden": 512,
              "embedding_size": 128},
    "dream": {"family": "dream", "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 384,
              "embedding_size": 101},
}


@attrs.define
class TrainConfig:
    family: str = "llada"
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_hidden: int = 768
    embedding_size: int = 128
    max_sequence_length: int = 2048
    rope_theta: float = 10000.0
    steps: int = 4000
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    # "cosine": warmup then cosine decay over the whole run; "wsd": warmup, the peak held, then a
    # linear decay over the last decay_fraction of the steps (keeps the lr high while slow skills
    # such as copying by position are still forming)
    schedule: str = attrs.field(default="cosine", validator=choice(*SCHEDULES))
    decay_fraction: float = attrs.field(default=0.2, validator=[at_least(0.0, strict=True), in_range(0.0, 1.0)])
    # "adamw", or "muon": Muon on the hidden matrices, AdamW on embeddings, head, norms (optimizers.py)
    optimizer: str = attrs.field(default="adamw", validator=choice(*OPTIMIZERS))
    muon_lr_scale: float = attrs.field(default=1.0, validator=at_least(0.0, strict=True))  # Muon lr / schedule lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    token_budget: int = 3072
    short_phase: float = 0.35  # fraction of the steps on short contexts first (default_curriculum)
    # share of zero-shot batches after the short phase (the rest few-shot and long canvases, 8:5)
    long_phase_zero_shot: float = attrs.field(default=LONG_PHASE_ZERO_SHOT,
                                              validator=in_range(0.0, 1.0, include_high=False))
    # pool of zero-shot pairs grouped by answer length, each batch's canvas cut to its longest answer
    # (whole blocks of 32); 0 = canvas 64 for every zero-shot batch (BatchKind.group_by_length)
    group_by_length: int = attrs.field(default=0, validator=at_least(0))
    max_rows: int = 64  # cap on rows per batch (short zero-shot batches hit it before the token budget)
    # family -> share of the training problems (e.g. {"expr": 3, "add": 2, "sort": 1, "reverse": 1});
    # None = the families in turn
    family_weights: dict[str, int] | None = attrs.field(default=None, validator=check_family_weights)
    # the mix from late_mix_start (a fraction of the steps) on; None = family_weights throughout
    late_family_weights: dict[str, int] | None = attrs.field(default=None, validator=check_family_weights)
    late_mix_start: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0, include_high=False))
    eps: float = DEFAULT_EPS
    # "inv_t": LLaDA's 1/t-weighted ELBO; "none": mean CE over masked tokens (see objective.py)
    weighting: str = "inv_t"
    stratified: bool = True  # low-discrepancy t over the batch
    # fraction of sequences noised as semi-autoregressive states of blocks of block_length (objective.py)
    block_prefix_prob: float = 0.0
    block_length: int = 32
    # fraction of the steps trained on i.i.d. masks only before block states begin
    block_prefix_start: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0, include_high=False))
    init_std: float = 0.02
    seed: int = 0
    # HF checkpoint directory whose weights start the run (fine-tuning / continuing an exported
    # model); None = random init. The optimizer and the schedule always start fresh.
    init_from: str | None = None
    log_every: int = 10
    checkpoint_every: int = 200

    def model_config(self) -> ModelConfig:
        dream = self.family == "dream"
        return ModelConfig(
            family=self.family, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, ffn_hidden=self.ffn_hidden, vocab_size=VOCAB_SIZE,
            embedding_size=VOCAB_SIZE if dream else self.embedding_size, rope_theta=self.rope_theta,
            rms_norm_eps=1e-6 if dream else 1e-5, max_sequence_length=self.max_sequence_length, qkv_bias=dream,
            tie_word_embeddings=False, logits_shift=dream, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
            pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        )


def init_weights(model: DiffusionTransformer, std: float, generator: torch.Generator) -> None:
    """Normal(0, std) matrices, output projections scaled by 1/sqrt(2 n_layers), zero biases, unit norms."""
    out_std = std / math.sqrt(2 * model.config.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.normal_(0.0, s, generator=generator)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        progress = min(1.0, max(0, step - decay_start) / max(1, cfg.steps - decay_start))
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike, curriculum: tuple[Phase, ...] | None = None,
                 progress: bool = True, device: str | torch.device = "cpu"):
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = torch.device(device)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.model = DiffusionTransformer(cfg.model_config())
        init_weights(self.model, cfg.init_std, torch.Generator().manual_seed(cfg.seed))
        if cfg.init_from is not None:
            self._load_weights(cfg.init_from)
        self.model.to(self.device).train()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas,
                                         cfg.muon_lr_scale)
        curriculum = curriculum or default_curriculum(cfg.short_phase, cfg.long_phase_zero_shot, cfg.group_by_length)
        self.sampler = BatchSampler(cfg.seed, curriculum, token_budget=cfg.token_budget, max_rows=cfg.max_rows,
                                    family_weights=cfg.family_weights, late_family_weights=cfg.late_family_weights,
                                    late_mix_start=cfg.late_mix_start)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.last_loss: float | None = None

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "train_config": attrs.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "last_loss": self.last_loss,
            "sampler": self.sampler.state_dict(),
            "noise_gen": self.noise_gen.get_state(),
            "device": str(self.device),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def save(self, export: bool = True) -> None:
        atomic_torch_save(self.state_dict(), self.out / CHECKPOINT)
        if export:
            self.export(self.out / "model")

    def export(self, directory: Path) -> Path:
        from ..models.tokenizer import build_tokenizer

        self.model.eval()
        try:
            return save_checkpoint(self.model, directory, tokenizer=build_tokenizer(), dtype="float32",
                                   generation=SUITE_GENERATION)
        finally:
            self.model.train()

    def _load_weights(self, directory: str) -> None:
        from ..models import load_model

        source = load_model(directory)
        if source.config != self.model.config:
            diff = {f: (getattr(source.config, f), getattr(self.model.config, f))
                    for f in attrs.fields_dict(type(source.config))
                    if getattr(source.config, f) != getattr(self.model.config, f) and f != "extra_stop_ids"}
            if diff:
                raise ValueError(f"init_from {directory}: architecture differs from this run's "
                                 f"(checkpoint, run): {diff}")
        self.model.load_state_dict(source.state_dict())

    def load(self, path: str | os.PathLike | None = None) -> None:
        state = torch.load(path or self.out / CHECKPOINT, map_location="cpu", weights_only=False)
        saved = TrainConfig(**{**state["train_config"], "betas": tuple(state["train_config"]["betas"])})
        for field in ("family", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "embedding_size",
                      "optimizer"):
            if getattr(saved, field) != getattr(self.cfg, field):
                raise ValueError(f"checkpoint was trained with {field}={getattr(saved, field)!r}, "
                                 f"this run has {getattr(self.cfg, field)!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.last_loss = state.get("last_loss")
        self.sampler.load_state_dict(state["sampler"])
        if self.noise_gen.device.type == torch.device(state.get("device", "cpu")).type:
            self.noise_gen.set_state(state["noise_gen"])
        else:  # resumed on another device type: the noise stream cannot continue bit-exactly
            self.noise_gen.manual_seed(self.cfg.seed + 1 + self.step)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        truncate_log(self.out / LOG, self.step)

    # ---- training ------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        batch = self.sampler.next_batch(self.step, cfg.steps)
        lr = lr_at(self.step, cfg)
        block_prob = cfg.block_prefix_prob if self.step >= cfg.block_prefix_start * cfg.steps else 0.0
        dev = self.device
        loss, _ = diffusion_loss(self.model, batch.input_ids.to(dev), batch.attention_mask.to(dev),
                                 batch.answer_mask.to(dev),
                                 self.noise_gen, cfg.eps, stratified=cfg.stratified, weighting=cfg.weighting,
                                 block_prefix_prob=block_prob, block_length=cfg.block_length)
        grad_norm = optimizer_step(self.model, self.optimizer, loss, lr, cfg.grad_clip)
        self.step += 1
        self.tokens += batch.real_tokens
        self.last_loss = loss.item()
        self._last_info = {"lr": lr, "grad_norm": grad_norm, "rows": batch.rows, "canvas": batch.canvas,
                           "kind": batch.kind, "width": batch.input_ids.shape[1]}
        return self.last_loss

    def run(self, max_steps: int | None = None, minutes: float | None = None) -> bool:
        """Train up to cfg.steps (or max_steps more steps, or `minutes` of wall time), checkpointing
        every cfg.checkpoint_every steps and at the end. Returns True when cfg.steps was reached."""
        from tqdm import tqdm

        cfg = self.cfg
        stop_at = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        deadline = None if minutes is None else time.monotonic() + 60 * minutes
        bar = tqdm(total=cfg.steps, initial=self.step, file=sys.stderr, disable=not self.progress,
                   dynamic_ncols=True, mininterval=5)
        window, window_n = 0.0, 0
        session_start, elapsed0 = time.monotonic(), self.elapsed
        with (self.out / LOG).open("a") as log:
            try:
                while self.step < stop_at:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    loss = self.train_step()
                    self.elapsed = elapsed0 + time.monotonic() - session_start
                    window, window_n = window + loss, window_n + 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == stop_at:
                        rec = {"step": self.step, "loss": round(window / window_n, 5), "last_loss": round(loss, 5),
                               "tokens": self.tokens, "elapsed": round(self.elapsed, 2), **self._last_info}
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{window / window_n:.4f}", lr=f"{self._last_info['lr']:.2e}")
                        window, window_n = 0.0, 0
                    if self.step % cfg.checkpoint_every == 0 and self.step < stop_at:
                        self.save()
            finally:
                bar.close()
                self.save()
        return self.step >= cfg.steps
