"""Fast-dLLM's dual KV cache (methods.md section 2).

At each block start one forward over the whole canvas refreshes the activation store (and decodes
like any other step). The other steps of the block feed only the block's own columns: their fresh
keys/values overwrite the block's rows of the store in place, and their queries attend over the
whole canvas, so the prefix and the masked suffix read the keys/values of the last refresh.

Dream: the reference commits the block's first column with its argmax at the refresh and nothing
else (`head_commit: auto`). Without that commit (`head_commit: off`) the column before the block is
fed too, because Dream scores column j from the row at j-1.

Options:
  refresh_every  also refresh every this many steps inside a block (0: at block starts only; 1: every
                 forward is a full forward, which reproduces the no-cache tokens when head_commit is off)
  head_commit    auto (Dream: on, LLaDA: off), on, off

Stats (under the plugin's name): refreshes, partial_forwards (forwards that did not feed every
column), rows_recomputed and cached_rows_read (key/value rows computed by a forward / attended to
without being recomputed, summed over layers, forwards and prompts; padding is never counted).
"""

from __future__ import annotations

import attrs

from dare_pipeline.config_loading import at_least, choice
from dare_pipeline.hookspecs import hookimpl
from dare_pipeline.plan import ForwardPlan
from dare_pipeline.plugin import Plugin


@attrs.frozen(kw_only=True)
class DualCacheOptions:
    refresh_every: int = attrs.field(default=0, validator=at_least(0))
    head_commit: str = attrs.field(default="auto", validator=choice("auto", "on", "off"))


class DualCache(Plugin):
    name = "dual_cache"
    Options = DualCacheOptions
    provides = frozenset({"row_feed"})
    exact_options = {"refresh_every": 1, "head_commit": "off"}

    @hookimpl
    def dare_generation_start(self, state):
        state.require_store()
        self.refreshes = 0
        self.partial_forwards = 0
        self.rows_recomputed = 0
        self.cached_rows_read = 0

    def _head_commit(self, state) -> bool:
        mode = self.options.head_commit
        return mode == "on" or (mode == "auto" and state.family == "dream")

    @hookimpl
    def dare_plan_forward(self, state):
        every, step = self.options.refresh_every, state.step_in_block
        if step == 0 or (every > 0 and step % every == 0):
            return ForwardPlan(fed=slice(0, state.length), refresh=True,
                               commit_block_head=step == 0 and self._head_commit(state))
        block = state.block_columns
        start = block.start
        if state.model.config.logits_shift and not self._head_commit(state):
            start -= 1  # the row that scores the block's first column
        return ForwardPlan(fed=slice(start, block.stop))

    @hookimpl
    def dare_step_end(self, state, committed):
        fed = state.plan.fed
        layers = state.model.config.n_layers
        real = state.model_rows(state.attention_mask)  # padding is never attended to
        fed_rows = real[:, fed].sum()  # kept on the device: no host sync per step, read at the report
        self.rows_recomputed = self.rows_recomputed + layers * fed_rows
        self.cached_rows_read = self.cached_rows_read + layers * (real.sum() - fed_rows)
        if state.plan.refresh:
            self.refreshes += 1
        if fed.start != 0 or fed.stop != state.length:
            self.partial_forwards += 1

    @hookimpl
    def dare_report_stats(self, state):
        return {"refreshes": self.refreshes, "partial_forwards": self.partial_forwards,
                "rows_recomputed": int(self.rows_recomputed), "cached_rows_read": int(self.cached_rows_read)}
