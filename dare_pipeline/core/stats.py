"""Counters of one generation: forwards, committed tokens, rows computed per layer and sub-operation."""

from __future__ import annotations

import attrs
import torch

# the four sub-operations a row runs through a layer, then value projections computed outside the
# K/V path (dLLM-Cache's V-verify computes values to compare, which no row runs through)
ROW_OPS = ("q", "kv", "attn", "ffn")
SUB_OPS = (*ROW_OPS, "v")


class RowCounter:
    """Rows computed per layer and sub-operation (`SUB_OPS`) over one generation.

    A forward adds counts that are either Python ints (whole fed slices: summed on the host) or
    device tensors (sums of reuse masks: kept as they are, folded on the device now and then, read
    once at the end). Counting therefore launches no kernel and never waits for the device; with
    counts held in a device tensor it cost a host-to-device copy per count and ~6 operators a layer.
    """

    FOLD_EVERY = 4096  # pending device counts summed into one tensor (bounds their memory)

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self._host = [[0] * len(SUB_OPS) for _ in range(n_layers)]
        self._pending: list[tuple[int, torch.Tensor]] = []  # (flat index, 0-d device count)
        self._folded: torch.Tensor | None = None  # (n_layers * 4,) on the counts' device

    def add(self, layer: int, counts) -> None:
        """Add one layer's rows: `counts` holds one int or 0-d tensor per sub-operation."""
        for j, c in enumerate(counts):
            if isinstance(c, torch.Tensor):
                self._pending.append((layer * len(SUB_OPS) + j, c))
            else:
                self._host[layer][j] += c
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        device = self._pending[0][1].device
        index = torch.tensor([i for i, _ in self._pending], device=device)
        values = torch.stack([c.reshape(()).to(torch.long) for _, c in self._pending])
        if self._folded is None:
            self._folded = torch.zeros(self.n_layers * len(SUB_OPS), dtype=torch.long, device=device)
        self._folded.index_add_(0, index, values)
        self._pending = []

    def totals(self) -> torch.Tensor:
        """(n_layers, len(SUB_OPS)) long tensor on the CPU (synchronises with the device once)."""
        self._fold()
        out = torch.tensor(self._host, dtype=torch.long)
        if self._folded is not None:
            out += self._folded.cpu().view(self.n_layers, len(SUB_OPS))
        return out


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
    row_counter: RowCounter | None = None  # what the model adds to at every layer of every forward
    plugins: dict[str, dict] = attrs.Factory(dict)
    # FLOPs of other models plugins ran for this generation, by name (guided diffusion's guide), on
    # top of the diffusion model's (estimated from `layer_rows`); totals in reports include them
    extra_flops: dict[str, int] = attrs.Factory(dict)
    # how the forwards ran: mode, compile_time_s (paid by this generation), compiles, eager_forwards
    execution: dict = attrs.Factory(lambda: {"mode": "eager"})
    # per forward, the (B,) device tensor of tokens committed; turned into tokens_per_step by finish()
    _commits: list[torch.Tensor] = attrs.Factory(list)

    def __attrs_post_init__(self):
        self.row_counter = RowCounter(self.n_layers)
        self.tokens_per_step = [[] for _ in range(self.batch)]

    def record_commits(self, per_prompt: torch.Tensor) -> None:
        """Tokens committed by one forward, (B,) on the device: kept there, no host sync."""
        self._commits.append(per_prompt)

    def record_extra_commits(self, per_prompt: torch.Tensor) -> None:
        """Tokens a plugin committed after the loop's commit of the last forward (DecodeState's
        `fill_after_stop`), (B,) on the device: they count as that forward's."""
        if not self._commits:
            raise RuntimeError("record_extra_commits: no forward has committed yet in this generation")
        self._commits[-1] = self._commits[-1] + per_prompt

    def add_extra_flops(self, name: str, flops: int) -> None:
        """FLOPs a plugin's own model computed (e.g. a guide's forwards), reported beside the diffusion model's."""
        self.extra_flops[name] = self.extra_flops.get(name, 0) + int(flops)

    def finish(self) -> None:
        """Read the device-side counters once, when the generation ends."""
        if self._commits:
            per_forward = torch.stack(self._commits, dim=1).cpu().tolist()  # (B, forwards)
            for b, counts in enumerate(per_forward):
                self.tokens_per_step[b].extend(counts)
            self._commits = []

    @property
    def layer_rows(self) -> torch.Tensor:
        """(n_layers, len(SUB_OPS)) rows computed per layer and sub-operation (CPU tensor)."""
        return self.row_counter.totals()

    @property
    def total_generated(self) -> int:
        return sum(self.generated_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.total_generated / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def rows_by_layer(self) -> list[dict[str, int]]:
        rows = self.layer_rows.tolist()
        return [dict(zip(SUB_OPS, r)) for r in rows]

    def to_dict(self) -> dict:
        return {
            "nfe": self.nfe, "steps": self.steps, "wall_time_s": round(self.wall_time_s, 6),
            "generated_tokens": self.generated_tokens, "total_generated_tokens": self.total_generated,
            "tokens_per_second": round(self.tokens_per_second, 3), "tokens_per_step": self.tokens_per_step,
            "rows_fed": self.rows_fed, "layer_rows": self.rows_by_layer(), "execution": self.execution,
            "plugins": self.plugins, "extra_flops": dict(self.extra_flops),
        }

    def summary(self) -> str:
        tps = [sum(t) / len(t) for t in self.tokens_per_step if t]
        avg = sum(tps) / len(tps) if tps else 0.0
        line = (f"nfe={self.nfe} generated={self.total_generated} tokens/step={avg:.2f} "
                f"time={self.wall_time_s:.3f}s tokens/s={self.tokens_per_second:.1f}")
        if self.execution.get("mode", "eager") != "eager":
            line += f" execution={self.execution['mode']} compile={self.execution.get('compile_time_s', 0.0):.1f}s"
        return line
