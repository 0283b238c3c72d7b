"""DARE-KV: reuse a row's cached keys and values while its query barely moves.

At every layer the query of each running row is computed anyway. Its drift
d = ||q - q_ref|| / ||q_ref|| over all heads, against the query it had when its K/V were last
recomputed at that layer, decides: rows with d < threshold skip the K and V projections and keep
the store's rows; the others recompute them and take q as their new reference. Always recomputed:
rows whose token changed since their last recompute at that layer, rows without K/V in the store,
every row at the generation's first forward and every `refresh_every` forwards (and, with
`recompute_at_refresh`, at each cache refresh: the row feeder's, or each block's first forward
without one), and every row of `exempt_layers`. A cache refresh feeds every row; without
`recompute_at_refresh` the rule decides which of them recompute, so reuse pays at exactly the
forwards that cost the most. Strict `<`: threshold 0 reuses nothing and reproduces the recipe
without this plugin token for token.

The reference query and the token are kept in the activation store (`dare_kv.q_ref`,
`dare_kv.token`, per layer and column); the plugin holds counters only.

Stacks with prefix_cache / dual_cache (it decides among the rows they still feed) and with every
decoding policy.

Options: threshold (default 0.05), exempt_layers, refresh_every, recompute_at_refresh, row_budget
(compiled execution, see docs/reuse.md), shadow (also compute the exact K/V of reused rows and
report their relative error per layer and forward; the decode still uses the reused rows).

Stats (under `dare_kv`): threshold, rows_eligible / rows_reused / reuse_fraction (running real rows
over all layers and forwards; padding is never counted), per_layer (eligible, reused,
reuse_fraction, recomputed {q, kv}), recompute_reasons (refresh, exempt, no_entry,
token_changed, block, drift), row_budget and reused_over_budget (compiled execution), and `shadow`
in shadow mode.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from dare_pipeline.config import at_least, in_range, layer_indices
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.reuse import WHOLE_LAYER_REUSE, DriftHooks, LayerReuse, QueryDrift, ShadowLog


@attrs.frozen(kw_only=True)
class DareKVOptions:
    # tau: a row is reused when ||q - q_ref|| / ||q_ref|| < threshold (strict: 0 reuses nothing)
    threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
    # layers that always recompute every row (layer 0's K/V depend only on token and position,
    # so reusing them there is exact)
    exempt_layers: tuple[int, ...] = attrs.field(default=(), validator=layer_indices)
    # also recompute every row at least every this many forwards (0: never after the first forward)
    refresh_every: int = attrs.field(default=0, validator=at_least(0))
    # also recompute every row at each cache refresh (the row feeder's, or each block's first forward
    # without one); off: the cached rows outlive refreshes, which is where reuse pays with a cache
    recompute_at_refresh: bool = False
    # the rows of the block being decoded always recompute; off: stale keys of the block's rows barely move its predictions
    recompute_block: bool = False
    # also compute the exact values of reused rows and report their relative error (slower; the
    # decode still uses the reused values; runs eagerly, it is not capturable)
    shadow: bool = False
    # compiled execution: the fraction of a layer's running rows that may recompute (null: all, which
    # keeps the threshold rule exact but saves nothing there); see docs/reuse.md
    row_budget: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1.0)))


class _KVReuse(LayerReuse):
    decisions = frozenset({"kv_rows"})

    def __init__(self, plugin: DareKV):
        self.plugin = plugin
        self.capturable = plugin.shadow is None

    def begin_forward(self, refresh, step):
        self.plugin.drift.begin_forward(refresh, step)

    def capacity(self, decision, layer, rows):
        return self.plugin.drift.capacity(layer, rows)

    def kv_rows(self, call, q):
        p = self.plugin
        recompute = p.drift.decide(call, q, call.store.kv_written(call.layer))
        if recompute is not None and p.shadow is not None:
            _shadow_kv(p, call, ~recompute)
        return recompute


def _shadow_kv(plugin: DareKV, call, reused: torch.Tensor) -> None:
    """Exact K/V of the reused rows vs the store's (reused) rows; nothing is written."""
    weight = reused & plugin.drift.real_rows(call)
    sel = weight.any(0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return
    cols = call.active[sel]
    fed_rows = cols - call.fed.start
    cos, sin = call.rope
    k, v = call.module.project_kv(call.h[:, sel], cos[:, :, fed_rows], sin[:, :, fed_rows])
    store, layer = call.store, call.layer
    exact = torch.cat([k, v], dim=-1).transpose(1, 2)  # (B, r, heads, 2 hd)
    cached = torch.cat([store.keys(layer)[:, :, cols], store.values(layer)[:, :, cols]], dim=-1).transpose(1, 2)
    plugin.shadow.record(call.step, layer, cached, exact, weight[:, sel])


class DareKV(DriftHooks, Plugin):
    """DARE-KV: reuse a row's cached keys and values while its query barely moves."""

    name = "dare_kv"
    Options = DareKVOptions
    provides = frozenset({"kv_rows"})
    store_fields = frozenset({"dare_kv.q_ref"})  # the query reference (QueryDrift)
    conflicts: ClassVar[dict[str, str]] = {"dllm_cache": WHOLE_LAYER_REUSE}
    exact_options: ClassVar[dict[str, Any]] = {"threshold": 0.0}

    @hookimpl
    def dare_generation_start(self, state):
        state.require_store()
        n_layers = state.model.config.n_layers
        self.drift = QueryDrift(self.name, self.options, n_layers, state.model_rows(state.attention_mask))
        cfg = state.model.config
        self.drift.prepare(state.store, cfg.n_heads * cfg.head_dim, state.model.dtype)
        self.shadow = ShadowLog(n_layers) if self.options.shadow else None

    @hookimpl
    def dare_layer_reuse(self, state):
        return _KVReuse(self)

    @hookimpl
    def dare_report_stats(self, state):
        report = self.drift.report("kv")
        if self.shadow is not None:
            report["shadow"] = self.shadow.report()
        return report
