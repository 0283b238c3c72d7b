"""What the Fast-dLLM KV caches (the prefix_cache and dual_cache plugins) share: a row feeder that
refreshes the activation store at block starts, Dream's block-head commit, and the counters.

A cache plugin subclasses `KVCacheFeeder` (its options have `refresh_every` and `head_commit`) and
implements `dare_plan_forward`; the base class keeps
the store on, counts per step and reports under the plugin's name: refreshes, partial_forwards
(forwards that did not feed every column), rows_recomputed and cached_rows_read (key/value rows
of the columns a forward fed / of those it kept out and attended to from the store, summed over
layers, forwards and prompts; padding is never counted). They say what the feeder did: a layer-row
plugin stacked on it (DARE-KV) keeps some fed rows' K/V too, and reports those itself (rows_reused).
"""

from __future__ import annotations

from ..core.hookspecs import hookimpl
from ..core.plugin import Plugin


class KVCacheFeeder(Plugin):
    provides = frozenset({"row_feed"})

    @hookimpl
    def dare_generation_start(self, state):
        state.require_store()
        self._real = state.model_rows(state.attention_mask)  # padding is never attended to
        self._real_rows = self._real.sum()  # on the device: no host sync, read at the report
        self.refreshes = 0
        self.partial_forwards = 0
        self.rows_recomputed = 0
        self.cached_rows_read = 0

    def is_refresh(self, state) -> bool:
        """Block starts, and every `refresh_every` steps inside a block when that option is > 0."""
        every, step = self.options.refresh_every, state.step_in_block
        return step == 0 or (every > 0 and step % every == 0)

    def head_commit(self, state) -> bool:
        """Commit the block's first column at a refresh (option `head_commit`: auto = Dream only)."""
        mode = self.options.head_commit
        return mode == "on" or (mode == "auto" and state.family == "dream")

    def block_feed_start(self, state) -> int:
        """First fed column of a partial forward: the block start, or the column before it where a
        shifted family must score the block's first column from it."""
        start = state.block_columns.start
        if state.model.config.logits_shift and not self.head_commit(state):
            start -= 1
        return start

    @hookimpl
    def dare_step_end(self, state, committed):
        fed = state.plan.fed
        layers = state.model.config.n_layers
        fed_rows = self._real[:, fed].sum()
        self.rows_recomputed = self.rows_recomputed + layers * fed_rows
        self.cached_rows_read = self.cached_rows_read + layers * (self._real_rows - fed_rows)
        if state.plan.refresh:
            self.refreshes += 1
        if fed.start != 0 or fed.stop != state.length:
            self.partial_forwards += 1

    @hookimpl
    def dare_report_stats(self, state):
        return {"refreshes": self.refreshes, "partial_forwards": self.partial_forwards,
                "rows_recomputed": int(self.rows_recomputed), "cached_rows_read": int(self.cached_rows_read)}
