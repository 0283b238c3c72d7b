"""The core denoising loop. Every hook point is visible here; see hookspecs.py for each contract."""

from __future__ import annotations

import time

import torch

from .layer_reuse import ReuseSet
from .plan import ForwardPlan
from .sampling import propose
from .state import DecodeState


class StepBudgetExceeded(RuntimeError):
    """A block still has masked positions after the step budget (the model keeps proposing the mask)."""


def denoise(model, prompts: list[list[int]], gen, hooks, seed: int | list[int] | None = None,
            executor=None) -> DecodeState:
    """Decode `prompts` (token id lists) with generation config `gen` and the plugins behind `hooks`
    (a pluggy HookRelay); `executor` (execution.Executor) runs the model's forwards, eagerly when None;
    `seed` seeds the sampling generators, one for every prompt or a list of one per prompt (default
    gen.seed). Returns the final DecodeState (canvas in `state.x`, stats in `state.stats`)."""
    state = DecodeState.create(model, gen, prompts, gen.seed if seed is None else seed, executor)
    if executor is not None:
        executor.begin_generation()
    started = time.perf_counter()
    try:
        _denoise_all_blocks(state, hooks)
        hooks.dare_generation_end(state=state)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        state.stats.wall_time_s = time.perf_counter() - started
        state.stats.steps = state.step
        state.stats.finish()
        if executor is not None:
            state.stats.execution = executor.report()
        for name, report in _named_reports(hooks, state):
            state.stats.plugins[name] = report
    except BaseException as error:  # also KeyboardInterrupt: plugins release files, bars, device memory
        _abort(hooks, state, error)
        raise
    return state


def _why_over_budget(state: DecodeState, budget: int) -> str:
    if budget < state.steps_per_block:  # a set bound below the schedule: a policy may need every step
        return (f"it is below the {state.steps_per_block} steps the schedule gives a block (generation.steps / "
                f"blocks): raise it to at least {state.steps_per_block}, or leave it unset")
    return "the model keeps proposing the mask token"


def _denoise_all_blocks(state: DecodeState, hooks) -> None:
    """Everything between the state's creation and dare_generation_end: the part that may raise."""
    gen = state.gen
    hooks.dare_generation_start(state=state)
    reuse = ReuseSet([r for r in hooks.dare_layer_reuse(state=state) if r is not None])
    if reuse:
        store = state.require_store()
        for name in reuse.fields:
            store.track(name)

    budget = gen.max_steps_per_block or 4 * max(state.steps_per_block, gen.block_length)
    for block in range(state.num_blocks):
        state.block, state.step_in_block = block, 0
        hooks.dare_block_start(state=state)
        sure = hooks.dare_block_min_forwards(state=state) or 0
        while _unfinished(state, sure):
            if state.step_in_block >= budget:
                raise StepBudgetExceeded(
                    f"block {block} still has {int(state.block_masked().sum())} masked positions after "
                    f"{budget} forwards (generation.max_steps_per_block); " + _why_over_budget(state, budget))
            hooks.dare_step_start(state=state)
            state.plan = hooks.dare_plan_forward(state=state) or _default_plan(state)
            proposal = _forward_and_propose(state, reuse)
            if state.plan.commit_block_head:
                committed = torch.zeros_like(proposal.candidates)
                committed[:, 0] = True
            else:
                committed = hooks.dare_select_commits(state=state, proposal=proposal)
            committed = _commit(state, proposal, committed)
            state.step += 1
            state.step_in_block += 1
            hooks.dare_step_end(state=state, committed=committed)
        hooks.dare_block_end(state=state)


def _unfinished(state: DecodeState, sure: int) -> bool:
    """Whether the block goes on, and which prompts still decode (`state.unfinished`, on the host for
    plugins). The step's one host read, skipped while the policy's bound says no prompt can be done."""
    if state.step_in_block < sure:
        state.unfinished = [True] * state.batch
    else:
        state.unfinished = state.block_masked().any(-1).tolist()
    return any(state.unfinished)


def _default_plan(state: DecodeState) -> ForwardPlan:
    """Without a row feeder every column is fed, and the block's first forward is the refresh (reuse
    objects may treat it as one: DARE recomputes every row there with `recompute_at_refresh`)."""
    return ForwardPlan.full(state.length, refresh=state.step_in_block == 0)


def candidate_columns(state: DecodeState) -> slice:
    """Columns a policy may commit this step: the current block (the whole answer is one block
    when block_length == gen_length)."""
    return state.block_columns


def _forward_and_propose(state: DecodeState, reuse: ReuseSet):
    model, plan = state.model, state.plan
    fed = plan.fed
    if state.store is None and (fed.start != 0 or fed.stop != state.length):
        raise RuntimeError("a partial forward needs the activation store: call state.require_store() "
                           "in dare_generation_start")
    cols = candidate_columns(state)
    head_rows = _prediction_rows(model.config.logits_shift, cols, fed, model.device)
    logits = model.forward_rows(state.model_tokens(fed), fed, state.model_rows(state.positions), state.key_mask,
                                state.store, reuse, head_rows=head_rows, counters=state.stats.row_counter,
                                refresh=plan.refresh, step=state.step, executor=state.executor)
    state.stats.nfe += 1
    state.stats.rows_fed += state.model_batch * (fed.stop - fed.start)
    if state.cfg_scale > 0:
        cond, uncond = logits.chunk(2)
        logits = uncond + (state.cfg_scale + 1) * (cond - uncond)
    gen = state.gen
    return propose(logits, state.x[:, cols], state.masked[:, cols], cols, family=state.family,
                   temperature=gen.temperature, remasking=gen.remasking, confidence=gen.confidence,
                   generators=state.generators, top_p=gen.top_p, top_k=gen.top_k)


def _prediction_rows(shifted: bool, cols: slice, fed: slice, device) -> torch.Tensor:
    """Fed-relative rows whose outputs predict canvas columns `cols`.

    Unshifted families predict column j at row j. Shifted ones (Dream) predict j from row j-1; the
    first fed row predicts itself, as the reference applies the shift within the fed slice."""
    if cols.start < fed.start or cols.stop > fed.stop:
        raise RuntimeError(f"candidate columns {cols} are not all fed ({fed})")
    rows = torch.arange(cols.start, cols.stop, device=device)
    if shifted:
        rows = (rows - 1).clamp(min=fed.start)
    return rows - fed.start


def _commit(state: DecodeState, proposal, committed: torch.Tensor) -> torch.Tensor:
    """Write the selected candidates into the canvas; returns what was committed (a selection may
    name a column that is no candidate: the block head of a row already filled with EOS)."""
    if committed is None:
        raise RuntimeError("no plugin answered dare_select_commits (no decoding policy registered)")
    committed = committed & proposal.candidates
    cols = proposal.columns
    state.x[:, cols] = torch.where(committed, proposal.tokens, state.x[:, cols])
    answer = slice(cols.start - state.prompt_end, cols.stop - state.prompt_end)
    state.unmask_step[:, answer] = torch.where(committed, state.step + 1, state.unmask_step[:, answer])
    state.stats.record_commits(committed.sum(-1))  # on the device; read once when the generation ends
    return committed


def _abort(hooks, state: DecodeState, error: BaseException) -> None:
    # every implementation runs even if one fails (a release that raises must not stop the others'),
    # and the original error stays the one raised, with any release failure noted on it
    for impl in reversed(hooks.dare_generation_abort.get_hookimpls()):
        try:
            impl.function(state=state, error=error)
        except Exception as failure:  # noqa: BLE001 -- reported on the original error instead
            error.add_note(f"{impl.plugin_name}.dare_generation_abort also failed: {failure!r}")


def _named_reports(hooks, state):
    # report results come back in call order; pair them with the plugin names that implement the hook
    impls = hooks.dare_report_stats.get_hookimpls()
    results = [impl.function(state=state) for impl in reversed(impls)]
    return [(impl.plugin_name, r) for impl, r in zip(reversed(impls), results) if r]
