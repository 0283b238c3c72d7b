"""Every step- and block-level hook point of the denoising loop.

The loop in loop.py calls these in this order for one generation:

    dare_generation_start(state)
    dare_layer_reuse(state)                          -> collected once, handed to the model
    for each block:
        dare_block_start(state)
        dare_block_min_forwards(state)               -> int           (the commit policy's bound)
        until the block has no masked position (not asked before that bound):
            dare_step_start(state)
            dare_plan_forward(state)                 -> ForwardPlan   (one owner: row_feed)
            <model forward over plan.fed>
            dare_select_commits(state, proposal)     -> bool mask     (one owner: commit_policy)
            dare_step_end(state, committed)
        dare_block_end(state)
    dare_generation_end(state)
    dare_report_stats(state)                         -> collected into stats["plugins"]

    dare_generation_abort(state, error)              if anything from dare_generation_start
                                                     to dare_report_stats raised

Layer-level behaviour does not go through pluggy (it would cost microseconds per layer per
step): a plugin returns a reuse.LayerReuse object from dare_layer_reuse and the model calls it.
"""

from __future__ import annotations

import pluggy

PROJECT = "dare_pipeline"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dare_generation_start(state):
    """A generation begins: reset per-generation state, ask for the activation store
    (`state.require_store()`), or ask the store to track fields."""


@hookspec
def dare_layer_reuse(state):
    """Return a reuse.LayerReuse the model calls at every layer of every forward, or None."""


@hookspec
def dare_block_start(state):
    """A block begins; `state.block` is its index and `state.block_columns` its canvas slice."""


@hookspec(firstresult=True)
def dare_block_min_forwards(state):
    """Return how many forwards every prompt of the batch needs at least in the current block (an
    int), or None. Before that many forwards the loop does not ask the device which prompts are done
    (it takes all as unfinished), so a fixed-schedule policy costs no host synchronisation per step.
    It must be a true lower bound for each prompt: a prompt done earlier would be taken as still
    decoding. Answered by the commit policy."""


@hookspec
def dare_step_start(state):
    """A decoding step begins (one model forward follows)."""


@hookspec(firstresult=True)
def dare_plan_forward(state):
    """Return the ForwardPlan of this step: which canvas columns enter the model and whether the
    forward refreshes the cache. One owner (decision `row_feed`); without one every column is fed and
    each block's first forward is the refresh."""


@hookspec(firstresult=True)
def dare_select_commits(state, proposal):
    """Return a bool tensor (B, c) over `proposal.columns`: the candidates to commit this step.
    One owner (decision `commit_policy`); the built-in `baseline` plugin is the default owner."""


@hookspec
def dare_step_end(state, committed):
    """A step ended; `committed` is the bool (B, c) mask of the block columns committed this step
    (what the policy selected among the candidates)."""


@hookspec
def dare_block_end(state):
    """A block is complete."""


@hookspec
def dare_generation_end(state):
    """The generation is complete; `state.x` holds the final canvas."""


@hookspec
def dare_generation_abort(state, error):
    """The generation raised `error` from dare_generation_start to dare_report_stats (a plugin, the
    model, the step budget, KeyboardInterrupt); the hooks after the one that raised will not fire.
    Release what the generation holds (files, progress bars, device memory), idempotently: it may fire
    when this plugin's own dare_generation_start did not run (an earlier plugin's raised) or after its
    own dare_generation_end ran (another plugin's end or report raised); `error` propagates afterwards."""


@hookspec
def dare_report_stats(state):
    """Return a dict of this plugin's counters for the generation's stats, or None."""
