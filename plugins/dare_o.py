"""DARE-O: reuse a row's cached attention output while its query barely moves.

At every layer the query of each running row is computed anyway. Its drift
d = ||q - q_ref|| / ||q_ref|| over all heads, against the query it had when its attention row was
last recomputed at that layer, decides: rows with d < threshold skip their attention row and the
output projection and add the cached attention delta (store field ATTN_OUT) to the residual stream;
the others recompute it and take q as their new reference. Keys and values are still computed for
every running row. Always recomputed: rows whose token changed since their last recompute at that
layer, rows without a cached attention output, every row at the generation's first forward and
every `refresh_every` forwards (and, with `recompute_at_refresh`, at each cache refresh: the row
feeder's, or each block's first forward without one), every row of `exempt_layers`, and (with
`recompute_block`, the default) the rows of the block being decoded: reusing their attention
output would hide the tokens just committed beside them (docs/reuse.md). Strict `<`: threshold 0
reuses nothing and reproduces the recipe without this plugin token for token.

The reference query and the token are kept in the activation store (`dare_o.q_ref`,
`dare_o.token`), the attention outputs in ATTN_OUT; the plugin holds counters only.

Stacks with prefix_cache / dual_cache (it decides among the rows they still feed), with dare_kv
(which decides K/V, a different decision) and with every decoding policy.

Options: threshold (default 0.05), exempt_layers, refresh_every, recompute_at_refresh, row_budget
(compiled execution, see docs/reuse.md), shadow (also compute the exact attention output of reused
rows and report its relative error per layer and forward; the decode still uses the reused rows).

Stats (under `dare_o`): threshold, rows_eligible / rows_reused / reuse_fraction (running real rows
over all layers and forwards; padding is never counted), per_layer (eligible, reused,
reuse_fraction, recomputed {q, attn}), recompute_reasons (refresh, exempt, no_entry,
token_changed, block, drift), row_budget and reused_over_budget (compiled execution), and `shadow`
in shadow mode.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from dare_pipeline.config import at_least, in_range, layer_indices
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.reuse import ATTN_OUT, WHOLE_LAYER_REUSE, DriftHooks, LayerReuse, QueryDrift, ShadowLog


@attrs.frozen(kw_only=True)
class DareOOptions:
    # tau: a row is reused when ||q - q_ref|| / ||q_ref|| < threshold (strict: 0 reuses nothing)
    threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
    # layers that always recompute every row; layer 0 by default: a row's layer-0 query depends only
    # on its token and position, so it never drifts, while its attention output depends on every
    # other row; reusing it would freeze the row's residual stream and every later query with it
    exempt_layers: tuple[int, ...] = attrs.field(default=(0,), validator=layer_indices)
    # also recompute every row at least every this many forwards (0: never after the first forward)
    refresh_every: int = attrs.field(default=0, validator=at_least(0))
    # also recompute every row at each cache refresh (the row feeder's, or each block's first forward
    # without one); off: the cached rows outlive refreshes, which is where reuse pays with a cache
    recompute_at_refresh: bool = False
    # the rows of the block being decoded always recompute; on: a block row that reuses its attention output misses the tokens just committed
    # beside it, and its next layers' queries barely move with it (the cascade of docs/reuse.md)
    recompute_block: bool = True
    # also compute the exact values of reused rows and report their relative error (slower; the
    # decode still uses the reused values; runs eagerly, it is not capturable)
    shadow: bool = False
    # compiled execution: the fraction of a layer's running rows that may recompute (null: all, which
    # keeps the threshold rule exact but saves nothing there); see docs/reuse.md
    row_budget: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1.0)))


class _AttnReuse(LayerReuse):
    decisions = frozenset({"attn_rows"})
    fields = frozenset({ATTN_OUT})

    def __init__(self, plugin: DareO):
        self.plugin = plugin
        self.capturable = plugin.shadow is None

    def begin_forward(self, refresh, step):
        self.plugin.drift.begin_forward(refresh, step)

    def capacity(self, decision, layer, rows):
        return self.plugin.drift.capacity(layer, rows)

    def attn_rows(self, call, q):
        p = self.plugin
        recompute = p.drift.decide(call, q, call.store.written(ATTN_OUT, call.layer))
        if recompute is not None and p.shadow is not None:
            _shadow_attn(p, call, q, ~recompute)
        return recompute


def _shadow_attn(plugin: DareO, call, q: torch.Tensor, reused: torch.Tensor) -> None:
    """Exact attention output of the reused rows (over the store's current K/V) vs the cached one."""
    weight = reused & plugin.drift.real_rows(call)
    sel = weight.any(0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return
    store, layer = call.store, call.layer
    exact = call.module.attend(q[:, :, sel], store.keys(layer), store.values(layer), call.key_mask)
    cached = store.read(ATTN_OUT, layer, call.active[sel])
    plugin.shadow.record(call.step, layer, cached, exact, weight[:, sel])


class DareO(DriftHooks, Plugin):
    """DARE-O: reuse a row's cached attention output while its query barely moves."""

    name = "dare_o"
    Options = DareOOptions
    provides = frozenset({"attn_rows"})
    store_fields = frozenset({"dare_o.q_ref", ATTN_OUT})  # the query reference and the attention outputs
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
        return _AttnReuse(self)

    @hookimpl
    def dare_report_stats(self, state):
        report = self.drift.report("attn")
        if self.shadow is not None:
            report["shadow"] = self.shadow.report()
        return report
