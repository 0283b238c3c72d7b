"""Counters of one generation: forwards, committed tokens, rows computed per layer and sub-operation."""

from __future__ import annotations

import attrs
import torch

SUB_OPS = ("q", "kv", "attn", "ffn")


@attrs.define
class GenerationStats:
    batch: int
    n_layers: int
    nfe: int = 0  # model forwards, full or partial
    steps: int = 0
    wall_time_s: float = 0.0
    generated_tokens: list[int] = attrs.Factory(list)  # per prompt: answer tokens before the first stop id
    tokens_per_step: list[list[int]] = attrs.Factory(list)  # per prompt, per forward
    rows_fed: int = 0  # rows entering the model, summed over forwards (batch rows counted)
    layer_rows: torch.Tensor | None = None  # (n_layers, 4) rows computed per sub-operation
    plugins: dict[str, dict] = attrs.Factory(dict)

    def __attrs_post_init__(self):
        self.layer_rows = torch.zeros(self.n_layers, len(SUB_OPS), dtype=torch.long)
        self.tokens_per_step = [[] for _ in range(self.batch)]

    @property
    def total_generated(self) -> int:
        return sum(self.generated_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.total_generated / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def rows_by_layer(self) -> list[dict[str, int]]:
        rows = self.layer_rows.cpu().tolist()
        return [dict(zip(SUB_OPS, r)) for r in rows]

    def to_dict(self) -> dict:
        return {
            "nfe": self.nfe, "steps": self.steps, "wall_time_s": round(self.wall_time_s, 6),
            "generated_tokens": self.generated_tokens, "total_generated_tokens": self.total_generated,
            "tokens_per_second": round(self.tokens_per_second, 3), "tokens_per_step": self.tokens_per_step,
            "rows_fed": self.rows_fed, "layer_rows": self.rows_by_layer(), "plugins": self.plugins,
        }

    def summary(self) -> str:
        tps = [sum(t) / len(t) for t in self.tokens_per_step if t]
        avg = sum(tps) / len(tps) if tps else 0.0
        return (f"nfe={self.nfe} generated={self.total_generated} tokens/step={avg:.2f} "
                f"time={self.wall_time_s:.3f}s tokens/s={self.tokens_per_second:.1f}")
