"""DecodeState.fill_after_stop: the early stop a policy may call from dare_step_end. Every masked
answer column after a row's first committed stop token becomes EOS, committed by the forward that
just ran; columns before it, and rows without a stop, are left alone; later blocks left without a
masked column take no forward."""

import torch

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.core import Plugin, hookimpl, registered
from dare_pipeline.plugin_kit.testing import tiny_model

torch.set_num_threads(1)
GEN = {"gen_length": 24, "block_length": 8, "steps": 24}
PROMPTS = [[5, 6, 7], [8, 9]]


class MostConfidentThenStop(Plugin):
    """One most confident candidate a step, then the early stop (no forward bound: a fill can end
    a block early)."""

    name = "most_confident_then_stop"
    provides = frozenset({"commit_policy"})

    @hookimpl
    def dare_generation_start(self, state):
        self.filled = 0

    @hookimpl
    def dare_select_commits(self, state, proposal):
        best = proposal.confidence.argmax(-1, keepdim=True)
        return torch.zeros_like(proposal.candidates).scatter_(-1, best, True)

    @hookimpl
    def dare_step_end(self, state, committed):
        self.filled += int(state.fill_after_stop().sum())


def _eos_model(column: int | None, rows=slice(None)):
    """A tiny model whose first-block forwards propose EOS at answer `column` above everything (in
    the batch rows `rows`)."""
    model = tiny_model("llada", seed=2)
    eos = model.config.eos_token_id
    original = model.lm_head.forward

    def head(hidden):
        logits = original(hidden).clone()
        if column is not None and logits.shape[1] == 8:  # the block's 8 rows (the loop's LM-head rows)
            logits[rows, column, eos] = 100.0
        return logits

    model.lm_head.forward = head
    return model


def _decode(model):
    with registered(MostConfidentThenStop):
        pipe = Pipeline(model, Recipe.from_dict({"generation": GEN, "plugins": ["most_confident_then_stop"]}))
        out = pipe.generate(PROMPTS)
    return out, next(p for p in pipe.plugins if p.name == "most_confident_then_stop")


def test_columns_after_the_first_committed_stop_become_eos_at_that_forward():
    model = _eos_model(column=2)
    out, policy = _decode(model)
    eos, tail = model.config.eos_token_id, GEN["gen_length"] - 3
    assert out.stats.nfe == 3  # EOS first, then the two columns before it; blocks 1 and 2 take none
    for steps, per_step, seq in zip(out.unmask_step, out.stats.tokens_per_step, out.sequences):
        assert steps[2] == 1 and steps[3:] == [1] * tail, "filled by the forward that committed the stop"
        assert sorted(steps[:2]) == [2, 3], "the columns before the stop decode as before"
        assert per_step == [1 + tail, 1, 1]
        assert seq[-tail:] == [eos] * tail
    assert [len(a) for a in out.answers] == [2, 2]
    assert policy.filled == 2 * tail


def test_without_a_committed_stop_nothing_changes():
    model = _eos_model(column=None)  # this seed's model never commits EOS in these answers
    out, policy = _decode(model)
    eos = model.config.eos_token_id
    assert policy.filled == 0 and out.stats.nfe == GEN["gen_length"]
    assert all(eos not in seq[len(p):] for seq, p in zip(out.sequences, PROMPTS))


class CommitWatcher(Plugin):
    """Records, for every step, the columns dare_step_end was told were committed that were not
    masked when the step began."""

    name = "commit_watcher"

    @hookimpl
    def dare_generation_start(self, state):
        self.phantom, self.told = [], 0

    @hookimpl
    def dare_step_start(self, state):
        self.masked = state.masked[:, state.block_columns].clone()

    @hookimpl
    def dare_step_end(self, state, committed):
        self.phantom.append((committed & ~self.masked).nonzero().tolist())
        self.told += int(committed.sum())


def test_step_end_is_told_only_what_was_committed():
    """A row filled with EOS early waits for its batch; the next block's head commit (prefix cache's
    `head_commit: on`) selects column 0 of every row, but that row has nothing to commit there."""
    model = _eos_model(column=2, rows=slice(0, 1))
    recipe = {"generation": GEN, "plugins": ["most_confident_then_stop", "commit_watcher",
                                             {"name": "prefix_cache", "head_commit": "on"}]}
    with registered(MostConfidentThenStop, CommitWatcher):
        pipe = Pipeline(model, Recipe.from_dict(recipe))
        out = pipe.generate(PROMPTS)
    watcher = next(p for p in pipe.plugins if p.name == "commit_watcher")
    eos_step = out.unmask_step[0][2]
    assert out.sequences[0][len(PROMPTS[0]) + 2:] == [model.config.eos_token_id] * (GEN["gen_length"] - 2)
    assert out.unmask_step[0][3:] == [eos_step] * (GEN["gen_length"] - 3)  # filled by the forward at the stop
    assert model.config.eos_token_id not in out.sequences[1][len(PROMPTS[1]):]  # decoded to the end
    assert watcher.phantom == [[]] * out.stats.nfe
    assert watcher.told == 3 + GEN["gen_length"]  # row 0 to its stop, row 1 everything
