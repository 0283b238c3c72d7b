"""input_drift: reuse a row's attention output while its attention input barely moves.

At every layer each running row's attention input h (its normed residual row, `call.h`) is
compared with the h it had when its attention output was last computed at that layer. Rows with
||h - h_ref|| / ||h_ref|| < threshold skip their attention row and output projection and add the
cached attention delta (store field ATTN_OUT); the others recompute it and take h as their new
reference. Strict `<`: threshold 0 reuses nothing and decodes exactly as without the plugin.

    plugins:
      - {name: input_drift, threshold: 0.05}
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from dare_pipeline.config import at_least, layer_indices
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.reuse import ATTN_OUT, LayerReuse

REF = "input_drift.h_ref"  # store field: per layer and column, the h of the row's last recompute


@attrs.frozen(kw_only=True)
class InputDriftOptions:
    # a row reuses its attention output when ||h - h_ref|| / ||h_ref|| < threshold (0: never)
    threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
    # layers where every row recomputes
    exempt_layers: tuple[int, ...] = attrs.field(default=(0,), validator=layer_indices)


class _AttnReuse(LayerReuse):
    decisions = frozenset({"attn_rows"})  # the one decision this object owns
    fields = frozenset({ATTN_OUT})  # the core keeps every layer's attention output in the store
    # compiled execution needs the store fields and counters made before the first forward and the
    # capacities declared (docs/plugins.md, "Reuse inside a compiled forward"); until then: eager forwards
    capturable = False

    def __init__(self, plugin: InputDrift):
        self.plugin = plugin

    def attn_rows(self, call, q):
        """(B, m) bool over the running rows (`call.active` are their canvas columns): True = recompute."""
        p, store, layer = self.plugin, call.store, call.layer
        if layer in p.options.exempt_layers:
            return None  # every row recomputes
        cols, h = call.active, call.h
        ref = store.field(REF, layer, h.shape[-1], h.dtype)[:, cols]
        cached = store.written(REF, layer)[:, cols] & store.written(ATTN_OUT, layer)[:, cols]
        drift = torch.linalg.vector_norm(h - ref, dim=-1) / \
            torch.linalg.vector_norm(ref, dim=-1).clamp_min(torch.finfo(h.dtype).tiny)
        reuse = cached & (drift < p.options.threshold)
        running = torch.ones_like(reuse) if call.run is None else call.run  # rows this element runs
        # a prompt whose block is done only waits for its batch: alone it would not run this forward,
        # so its rows are reused, neither written nor counted
        running = running & p.decoding[:, None]
        real = p.real[:, cols] & running  # padding is never counted
        recompute = running & ~reuse
        store.write(REF, layer, cols, h, recompute)  # recomputed rows take h as their reference
        p.counts += torch.stack([real.sum(), (reuse & real).sum()])
        return recompute


class InputDrift(Plugin):
    name = "input_drift"
    Options = InputDriftOptions
    provides = frozenset({"attn_rows"})
    conflicts: ClassVar[dict[str, str]] = {}
    exact_options: ClassVar[dict[str, Any]] = {"threshold": 0.0}  # the contract checks exactness here
    store_fields: ClassVar[frozenset[str]] = frozenset({REF, ATTN_OUT})  # the memory check counts them

    @hookimpl
    def dare_generation_start(self, state):
        n_layers = state.model.config.n_layers
        if any(layer >= n_layers for layer in self.options.exempt_layers):
            raise ValueError(f"{self.name}: exempt_layers = {list(self.options.exempt_layers)}: the model has "
                             f"{n_layers} layers (0..{n_layers - 1})")
        state.require_store()
        self.real = state.model_rows(state.attention_mask)  # (B, L) bool: not padding
        self.counts = torch.zeros(2, dtype=torch.long, device=self.real.device)  # eligible, reused

    @hookimpl
    def dare_step_start(self, state):
        # (B,) which prompts decode this forward (a decoding policy may finish a prompt's block early)
        self.decoding = torch.tensor(state.unfinished_model_rows, device=self.real.device)

    @hookimpl
    def dare_layer_reuse(self, state):
        return _AttnReuse(self)

    @hookimpl
    def dare_report_stats(self, state):
        eligible, reused = self.counts.tolist()
        return {"threshold": self.options.threshold, "rows_eligible": eligible, "rows_reused": reused,
                "reuse_fraction": round(reused / eligible, 6) if eligible else 0.0}
