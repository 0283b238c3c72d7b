"""FFN reuse: reuse a row's cached feed-forward output while the FFN's input row barely moves.

At every layer each running row enters the feed-forward block with x, its residual row after
attention (computed anyway). Its drift d = ||x - x_ref|| / ||x_ref||, against the x it had when
its FFN output was last recomputed at that layer, decides: rows with d < threshold skip the FFN
(gate, up and down projections) and add the cached FFN delta (store field FFN_OUT) to the residual
stream; the others run it and take x as their new reference. Attention, keys and values run as
without this plugin: only the FFN is skipped (the `ffn_rows` decision). Always recomputed: rows
whose token changed since their last recompute at that layer, rows without a cached FFN output,
every row at the generation's first forward and every `refresh_every` forwards (and, with
`recompute_at_refresh`, at each cache refresh), every row of `exempt_layers`, and (with
`recompute_block`) the rows of the block being decoded. Strict `<`: threshold 0 reuses nothing
and reproduces the recipe without this plugin token for token.

The reference input and the token are kept in the activation store (`ffn_reuse.q_ref`,
`ffn_reuse.token`: the drift bookkeeping of `reuse.QueryDrift`, here fed the FFN input), the
FFN outputs in FFN_OUT; the plugin holds counters only.

Stacks with prefix_cache / dual_cache (it decides among the rows they still feed), with dare_kv
and dare_o (other decisions) and with every decoding policy.

Options: threshold (default 0.05), exempt_layers, refresh_every, recompute_at_refresh,
recompute_block, row_budget (compiled execution, as for the DARE plugins: docs/reuse.md).

Stats (under `ffn_reuse`): threshold, rows_eligible / rows_reused / reuse_fraction (running real
rows over all layers and forwards; padding is never counted), per_layer (eligible, reused,
reuse_fraction, recomputed {q, ffn}), recompute_reasons (refresh, exempt, no_entry,
token_changed, block, drift), row_budget and reused_over_budget.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from dare_pipeline.config import at_least, in_range, layer_indices
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.reuse import FFN_OUT, DriftHooks, LayerReuse, QueryDrift

WHOLE_LAYER_REUSE = ("dLLM-Cache already decides per layer which rows run the layer at all, FFN included (its "
                     "V-verify picks the rows whose values moved most); an input-drift rule inside those rows would "
                     "skip the FFN of exactly the rows flagged as changed")


@attrs.frozen(kw_only=True)
class FfnReuseOptions:
    # a row's FFN output is reused when ||x - x_ref|| / ||x_ref|| < threshold (strict: 0 reuses nothing)
    threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
    # layers that always run the FFN for every row
    exempt_layers: tuple[int, ...] = attrs.field(default=(), validator=layer_indices)
    # also recompute every row at least every this many forwards (0: never after the first forward)
    refresh_every: int = attrs.field(default=0, validator=at_least(0))
    # also recompute every row at each cache refresh (the row feeder's, or each block's first forward
    # without one); off: the cached rows outlive refreshes
    recompute_at_refresh: bool = False
    # the rows of the block being decoded always run the FFN
    recompute_block: bool = False
    # compiled execution: the fraction of a layer's running rows that may run the FFN (null: all)
    row_budget: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1.0)))


class _FfnReuse(LayerReuse):
    decisions = frozenset({"ffn_rows"})
    fields = frozenset({FFN_OUT})
    capturable = True

    def __init__(self, plugin: FfnReuse):
        self.plugin = plugin

    def begin_forward(self, refresh, step):
        self.plugin.drift.begin_forward(refresh, step)

    def capacity(self, decision, layer, rows):
        return self.plugin.drift.capacity(layer, rows)

    def ffn_rows(self, call, x):
        # QueryDrift compares (B, heads, m, hd) rows: the FFN input is one "head" of width d_model
        return self.plugin.drift.decide(call, x[:, None], call.store.written(FFN_OUT, call.layer))


class FfnReuse(DriftHooks, Plugin):
    """FFN reuse: reuse a row's cached feed-forward output while the FFN's input row barely moves."""

    name = "ffn_reuse"
    Options = FfnReuseOptions
    provides = frozenset({"ffn_rows"})
    store_fields = frozenset({"ffn_reuse.q_ref", FFN_OUT})  # the query reference and the FFN outputs
    conflicts: ClassVar[dict[str, str]] = {"dllm_cache": WHOLE_LAYER_REUSE}
    exact_options: ClassVar[dict[str, Any]] = {"threshold": 0.0}

    @hookimpl
    def dare_generation_start(self, state):
        store = state.require_store()
        cfg = state.model.config
        self.drift = QueryDrift(self.name, self.options, cfg.n_layers, state.model_rows(state.attention_mask))
        self.drift.prepare(store, cfg.d_model, state.model.dtype)
        for layer in range(cfg.n_layers):  # created before the first forward: a compiled one cannot
            store.field(FFN_OUT, layer, cfg.d_model)

    @hookimpl
    def dare_layer_reuse(self, state):
        return _FfnReuse(self)

    @hookimpl
    def dare_report_stats(self, state):
        return self.drift.report("ffn")
