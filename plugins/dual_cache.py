"""Fast-dLLM's dual KV cache.

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

Stats (under the plugin's name): refreshes, partial_forwards, rows_recomputed, cached_rows_read
(see dare_pipeline/reuse/kv_cache.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from dare_pipeline.config import at_least, choice
from dare_pipeline.core import ForwardPlan, hookimpl
from dare_pipeline.reuse import KVCacheFeeder


@attrs.frozen(kw_only=True)
class DualCacheOptions:
    refresh_every: int = attrs.field(default=0, validator=at_least(0))
    head_commit: str = attrs.field(default="auto", validator=choice("auto", "on", "off"))


class DualCache(KVCacheFeeder):
    """Fast-dLLM's dual KV cache: after a block's refresh, feed only the block's own columns."""

    name = "dual_cache"
    Options = DualCacheOptions
    exact_options: ClassVar[dict[str, Any]] = {"refresh_every": 1, "head_commit": "off"}

    @hookimpl
    def dare_plan_forward(self, state):
        if self.is_refresh(state):
            return ForwardPlan(fed=slice(0, state.length), refresh=True,
                               commit_block_head=state.step_in_block == 0 and self.head_commit(state))
        return ForwardPlan(fed=slice(self.block_feed_start(state), state.block_columns.stop))
