"""Helpers for tests of the core and of plugins (third-party ones included): tiny random models,
and a plugin that makes a generation fail part-way."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.hookspecs import hookimpl
from ..core.plugin import Plugin
from ..models.config import ModelConfig
from ..models.transformer import DiffusionTransformer


def tiny_config(family: str = "llada", *, d_model: int = 48, n_layers: int = 2, n_heads: int = 4,
                n_kv_heads: int | None = None, vocab_size: int = 64, max_sequence_length: int = 1024) -> ModelConfig:
    """A small config of either family; the last two ids are EOS and the mask."""
    return ModelConfig(
        family=family, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads or (n_heads // 2 if family == "dream" else n_heads), ffn_hidden=2 * d_model,
        vocab_size=vocab_size, embedding_size=vocab_size, rope_theta=10000.0,
        max_sequence_length=max_sequence_length, qkv_bias=family == "dream", logits_shift=family == "dream",
        mask_token_id=vocab_size - 1, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 2,
    )


def tiny_model(family: str = "llada", seed: int = 0, sharpness: float = 4.0, **config) -> DiffusionTransformer:
    """A seeded random model with peaked output distributions (LM head scaled by `sharpness`) that
    never proposes the mask token (its LM-head row is zero, as in a trained model)."""
    cfg = tiny_config(family, **config)
    gen = torch.Generator().manual_seed(seed)
    model = DiffusionTransformer(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        model.lm_head.weight.mul_(sharpness)
        model.lm_head.weight[cfg.mask_token_id] = 0
    model.eval().requires_grad_(False)
    model.tokenizer = None
    model.source = f"<tiny {family} seed={seed}>"
    return model


def random_prompts(n: int, vocab_size: int, seed: int, min_len: int = 3, max_len: int = 12,
                   exclude: tuple[int, ...] = ()) -> list[list[int]]:
    """n prompts of random lengths over ids that are not special."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in exclude])
    prompts = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        prompts.append(allowed[torch.randint(len(allowed), (length,), generator=gen)].tolist())
    return prompts


def commit_order(unmask_step: list[int], before: int | None = None) -> list[set[int]]:
    """The sets of answer positions committed per forward, in forward order, empty forwards left
    out (runs that differ only by forwards committing nothing, or by a prompt waiting for its batch,
    compare equal); with `before`, only forwards numbered below it."""
    groups: dict[int, set[int]] = {}
    for pos, step in enumerate(unmask_step):
        if before is None or step < before:
            groups.setdefault(step, set()).add(pos)
    return [groups[k] for k in sorted(groups)]


def save_tiny_suite_checkpoint(directory) -> Path:
    """A tiny random LLaDA with the suite's tokenizer (MASK 4, EOS 2, PAD 0, BOS 1, vocab 101), saved
    as a complete HF-format checkpoint in `directory`: what evaluation and ablation tests decode with."""
    import attrs

    from ..models.saving import save_checkpoint
    from ..models.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE

    model = tiny_model("llada", vocab_size=VOCAB_SIZE, d_model=32, n_heads=2, max_sequence_length=640)
    model.config = attrs.evolve(model.config, mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                bos_token_id=BOS_ID)
    with torch.no_grad():
        model.lm_head.weight[MASK_ID] = 0  # never proposes the mask, like a trained model
    return save_checkpoint(model, directory, tokenizer=True)


class CrashAtStep(Plugin):
    """An observer that raises RuntimeError at the end of forward `at_step` while `armed` (register it
    with registry.registered): how tests check that plugins recover from an aborted generation."""

    name = "crash_at_step"

    def __init__(self, options=None):
        super().__init__(options)
        self.armed, self.at_step = True, 2

    @hookimpl
    def dare_step_end(self, state, committed):
        if self.armed and state.step == self.at_step:
            raise RuntimeError(f"crash at step {state.step}")
