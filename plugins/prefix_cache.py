"""Fast-dLLM's prefix KV cache, with FreeCache's frozen blocks as an option.

At each block start one forward over the whole canvas refreshes the activation store (and decodes
like any other step). The other steps of the block feed only the columns from the block start to
the end of the canvas: their fresh keys/values are written into the store, and their queries attend
over the whole store, so the columns before the block read the keys/values of the last refresh.

Dream: the reference commits the block's first column with its argmax at the refresh and nothing
else (`head_commit: auto`). Without that commit (`head_commit: off`) the column before the block is
fed too, because Dream scores column j from the row at j-1.

Options:
  refresh_every           also refresh every this many steps inside a block (0: at block starts only;
                          1: every forward is a full forward, which reproduces the no-cache tokens
                          when head_commit is off)
  freeze_finished_blocks  FreeCache: a refresh feeds only from the start of the block just finished
                          (its rows are recomputed once with their final tokens), every earlier
                          column keeps the keys/values it had; the prompt is computed once
  head_commit             auto (Dream: on, LLaDA: off), on, off

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
class PrefixCacheOptions:
    refresh_every: int = attrs.field(default=0, validator=at_least(0))
    freeze_finished_blocks: bool = False
    head_commit: str = attrs.field(default="auto", validator=choice("auto", "on", "off"))


class PrefixCache(KVCacheFeeder):
    """Fast-dLLM's prefix KV cache (FreeCache's frozen blocks as an option): feed the block and what follows."""

    name = "prefix_cache"
    Options = PrefixCacheOptions
    exact_options: ClassVar[dict[str, Any]] = {"refresh_every": 1, "freeze_finished_blocks": False, "head_commit": "off"}

    def _refresh_start(self, state) -> int:
        if not self.options.freeze_finished_blocks or state.block == 0:
            return 0
        if state.step_in_block == 0:  # the block just finished is recomputed once, then frozen
            return state.block_slice(state.block - 1).start
        return self.block_feed_start(state)  # everything before the block is frozen already

    @hookimpl
    def dare_plan_forward(self, state):
        if self.is_refresh(state):
            head = self.head_commit(state) and state.step_in_block == 0
            return ForwardPlan(fed=slice(self._refresh_start(state), state.length), refresh=True,
                               commit_block_head=head)
        return ForwardPlan(fed=slice(self.block_feed_start(state), state.length))
