"""The reference decoding policy: a fixed number of commits per step, the most confident first.

Schedules (generation.schedule):
- `linear` (LLaDA): each block's masked count spread evenly over its steps, remainder first;
- `timesteps` (Dream): at step i commit int(n * (1 - t[i+1]/t[i])) of the n masked candidates,
  t = linspace(1, eps, steps_per_block + 1), everything left at the last step.
Confidence (generation.confidence) and random remasking are computed by the core's proposal.
This plugin is the default owner of `commit_policy`: a recipe that names another policy replaces it.
"""

from __future__ import annotations

from dare_pipeline.hookspecs import hookimpl
from dare_pipeline.plugin import Plugin
from dare_pipeline.sampling import top_k_mask
from dare_pipeline.schedule import linear_counts, timestep_count


class BaselineDecoding(Plugin):
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
    def dare_select_commits(self, state, proposal):
        step, steps = state.step_in_block, state.steps_per_block
        if state.gen.schedule == "linear":
            # past the planned steps (a proposal equal to the mask token) commit one per step
            counts = self._counts[:, step] if step < steps else proposal.candidates.any(-1).long()
        else:
            counts = timestep_count(proposal.candidates.sum(-1), step, steps, state.gen.timestep_eps)
        return top_k_mask(proposal.confidence, counts)
