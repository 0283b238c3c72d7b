"""The reference decoding policy: a fixed number of commits per step, the most confident first.

Schedules (generation.schedule):
- `linear` (LLaDA): each block's masked count spread evenly over its steps, remainder first;
- `timesteps` (Dream): at step i commit int(n * (1 - t[i+1]/t[i])) of the n masked candidates,
  t = linspace(1, eps, steps_per_block + 1), everything left at the last step.
Confidence (generation.confidence) and random remasking are computed by the core's proposal.
This plugin is the default owner of `commit_policy`: a recipe that names another policy replaces it.

A step's decision runs on the device without a host synchronisation (counts and top-k ranks are
tensors). `dare_block_min_forwards` reads the block's masked count once (one host sync a block) and
returns how many forwards the schedule needs at least, so the loop asks the device "block
finished?" only after that many; it stays a lower bound when a row feeder commits the block head at
the first forward and when the model proposes the mask token (both only commit less).
"""

from __future__ import annotations

from dare_pipeline.core import (
    Plugin,
    hookimpl,
    linear_counts,
    linear_min_forwards,
    timestep_count,
    timestep_min_forwards,
    top_k_mask,
)


class BaselineDecoding(Plugin):
    """The reference decoding policy: a fixed number of commits per step, the most confident first."""

    name = "baseline"
    provides = frozenset({"commit_policy"})

    @hookimpl
    def dare_generation_start(self, state):
        self._counts = None

    @hookimpl
    def dare_block_start(self, state):
        if state.gen.schedule == "linear":
            self._counts = linear_counts(state.block_masked().sum(-1), state.steps_per_block)

    @hookimpl
    def dare_block_min_forwards(self, state):
        # the bound of the row with the fewest masked columns: before it no prompt can be done, so the
        # loop may also tell plugins that every prompt still decodes (state.unfinished)
        masked = int(state.block_masked().sum(-1).min())
        steps = state.steps_per_block
        if state.gen.schedule == "linear":
            return linear_min_forwards(masked, steps)
        return timestep_min_forwards(masked, steps, state.gen.timestep_eps, state.x.device)

    @hookimpl
    def dare_select_commits(self, state, proposal):
        step, steps = state.step_in_block, state.steps_per_block
        if state.gen.schedule == "linear":
            # past the planned steps (a proposal equal to the mask token) commit one per step
            counts = self._counts[:, step] if step < steps else proposal.candidates.any(-1).long()
        else:
            counts = timestep_count(proposal.candidates.sum(-1), step, steps, state.gen.timestep_eps)
        return top_k_mask(proposal.confidence, counts)
