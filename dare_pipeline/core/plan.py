"""ForwardPlan: which canvas columns enter the model at one step (the row feeder's decision)."""

from __future__ import annotations

import attrs


@attrs.frozen
class ForwardPlan:
    # contiguous absolute canvas columns fed to the model; attention still spans the whole canvas
    # through the activation store
    fed: slice
    # a cache refresh: the row feeder recomputes its cached rows (every fed row enters the model);
    # reuse objects decide whether to recompute theirs there too (DARE's `recompute_at_refresh`)
    refresh: bool = False
    # commit the current block's first column with its proposed token and nothing else, without
    # asking the decoding policy: Dream's reference does this at every cache refresh, because that
    # column is the next-token prediction of the column before it
    commit_block_head: bool = False

    @classmethod
    def full(cls, length: int, refresh: bool = True) -> ForwardPlan:
        return cls(fed=slice(0, length), refresh=refresh)
