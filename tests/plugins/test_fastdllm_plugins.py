"""The Fast-dLLM plugins: step-budget guard, cache counters, Dream's head commit and fed rows, the
factor rule's edge cases, options and recipes. Token parity with the reference is in
tests/parity/test_fastdllm_parity.py; batch and exactness properties in test_cache_property.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dare_pipeline_plugins.factor_decoding import factor_count

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.core.loop import StepBudgetExceeded
from dare_pipeline.core.registry import available_plugins, registered
from dare_pipeline.plugin_kit.testing import random_prompts, tiny_model

torch.set_num_threads(1)

RECIPES = Path(__file__).parents[2] / "recipes"
GEN = {"gen_length": 24, "block_length": 8, "steps": 24}
CACHES = ["prefix_cache", "dual_cache"]
POLICIES = ["baseline", "threshold_decoding", "factor_decoding"]


def _pipe(model, plugins, **gen):
    return Pipeline(model, Recipe.from_dict({"generation": {**GEN, **gen}, "plugins": plugins}))


class FedRecorder(Plugin):
    """Records the plan of every forward (no decision of its own)."""

    name = "fed_recorder"

    def __init__(self, options=None):
        super().__init__(options)
        self.plans = []

    @hookimpl
    def dare_step_end(self, state, committed):
        # the loop has counted the step already: the forward just run was step_in_block - 1
        self.plans.append((state.block, state.step_in_block - 1, state.plan))


def _recorded(pipe):
    return next(p for p in pipe.plugins if p.name == "fed_recorder").plans


# ---- step budget ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [None, *CACHES])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_model_proposing_only_the_mask_hits_the_step_budget(family, cache, policy):
    model = tiny_model(family, seed=0)
    cfg = model.config
    head = torch.nn.Linear(cfg.d_model, cfg.embedding_size, bias=True)
    with torch.no_grad():  # a model whose every row proposes the mask token, whatever its input
        head.weight.zero_()
        head.bias.zero_()
        head.bias[cfg.mask_token_id] = 10.0
    model.lm_head = head
    plugins = [p for p in (cache, policy) if p and p != "baseline"]
    with pytest.raises(StepBudgetExceeded, match=r"block 0 still has \d+ masked positions after 12 forwards "
                                                 r".*keeps proposing the mask token"):
        _pipe(model, plugins, max_steps_per_block=12).generate([[1, 2, 3]])


# ---- cache counters ------------------------------------------------------------------------------
def test_dual_cache_counters():
    model = tiny_model("llada", seed=1)
    prompt = [5, 6, 7, 8]
    out = _pipe(model, ["dual_cache"]).generate([prompt])
    report = out.stats.plugins["dual_cache"]
    layers, length, blocks = model.config.n_layers, len(prompt) + GEN["gen_length"], 3
    partial = out.stats.nfe - blocks
    assert report["refreshes"] == blocks
    assert report["partial_forwards"] == partial > 0
    assert report["rows_recomputed"] == layers * (blocks * length + partial * GEN["block_length"])
    assert report["cached_rows_read"] == layers * partial * (length - GEN["block_length"]) > 0
    # the core's per-layer counters agree: every fed row computes its K/V
    assert report["rows_recomputed"] == int(out.stats.layer_rows[:, 1].sum()) == layers * out.stats.rows_fed


def test_prefix_cache_counters_and_frozen_blocks():
    model = tiny_model("llada", seed=1)
    prompt = [5, 6, 7, 8]
    length, layers = len(prompt) + GEN["gen_length"], model.config.n_layers
    out = _pipe(model, ["prefix_cache"]).generate([prompt])
    report = out.stats.plugins["prefix_cache"]
    per_block = GEN["steps"] // 3
    prefix_rows = sum((per_block - 1) * (len(prompt) + b * GEN["block_length"]) for b in range(3))
    assert report["refreshes"] == 3 and report["partial_forwards"] == out.stats.nfe - 3
    assert report["cached_rows_read"] == layers * prefix_rows
    assert report["rows_recomputed"] + report["cached_rows_read"] == layers * length * out.stats.nfe

    frozen = _pipe(model, [{"name": "prefix_cache", "freeze_finished_blocks": True}]).generate([prompt])
    freport = frozen.stats.plugins["prefix_cache"]
    assert freport["refreshes"] == 3
    assert freport["partial_forwards"] == frozen.stats.nfe - 1  # only block 0's refresh feeds everything
    assert freport["rows_recomputed"] < report["rows_recomputed"]


def test_counters_skip_padding_and_reset_between_generations():
    model = tiny_model("llada", seed=2)
    pipe = _pipe(model, ["dual_cache", "threshold_decoding"])
    prompts = [[1, 2], [3, 4, 5, 6, 7]]
    first, second = pipe.generate(prompts), pipe.generate(prompts)
    assert first.stats.plugins == second.stats.plugins
    assert first.sequences == second.sequences
    report = first.stats.plugins["dual_cache"]
    real = len(prompts[0]) + len(prompts[1]) + 2 * GEN["gen_length"]  # padding is never read
    assert report["rows_recomputed"] + report["cached_rows_read"] == model.config.n_layers * real * first.stats.nfe


@pytest.mark.parametrize("cache", CACHES)
def test_a_cache_that_is_never_reused_shows_no_partial_forward(cache):
    # threshold 0 completes every block at its refresh forward: nothing is ever served from the cache
    model = tiny_model("llada", seed=3)
    out = _pipe(model, [cache, {"name": "threshold_decoding", "threshold": 0.0}]).generate([[1, 2, 3]])
    report = out.stats.plugins[cache]
    assert out.stats.nfe == report["refreshes"] == 3
    assert report["partial_forwards"] == 0 and report["cached_rows_read"] == 0


# ---- Dream: head commit and fed rows -------------------------------------------------------------
@pytest.mark.parametrize("cache", CACHES)
def test_dream_refresh_commits_the_block_head_only(cache):
    model = tiny_model("dream", seed=4)
    with registered(FedRecorder):
        pipe = _pipe(model, [cache, "fed_recorder"], schedule="timesteps", confidence="neg_entropy")
        out = pipe.generate([[1, 2, 3, 4]])
    plans = _recorded(pipe)
    refresh_steps = [i + 1 for i, (_, step, plan) in enumerate(plans) if step == 0]
    assert all(plan.commit_block_head == (step == 0) for _, step, plan in plans)
    assert [out.stats.tokens_per_step[0][s - 1] for s in refresh_steps] == [1, 1, 1]
    heads = [out.unmask_step[0][b * GEN["block_length"]] for b in range(3)]
    assert heads == refresh_steps
    assert out.stats.nfe == GEN["steps"]  # each block costs exactly its steps


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("head_commit, offset", [("auto", 0), ("off", 1)])
def test_dream_feeds_the_row_that_scores_the_block_head(cache, head_commit, offset):
    # Dream scores column j from row j-1: without the head commit the block's first column is a
    # candidate at every step, so the row before the block is fed too
    model = tiny_model("dream", seed=5)
    prompt = [1, 2, 3, 4, 5]
    with registered(FedRecorder):
        pipe = _pipe(model, [{"name": cache, "head_commit": head_commit}, "fed_recorder"])
        pipe.generate([prompt])
    for block, step, plan in _recorded(pipe):
        start = len(prompt) + block * GEN["block_length"]
        if step == 0:
            assert plan.refresh and plan.fed == slice(0, len(prompt) + GEN["gen_length"])
        else:
            assert not plan.refresh and plan.fed.start == start - offset
            assert plan.fed.stop == (start + GEN["block_length"] if cache == "dual_cache"
                                     else len(prompt) + GEN["gen_length"])


def test_llada_never_commits_the_head_by_default():
    model = tiny_model("llada", seed=5)
    with registered(FedRecorder):
        pipe = _pipe(model, ["prefix_cache", "fed_recorder"])
        pipe.generate([[1, 2, 3]])
    assert not any(plan.commit_block_head for _, _, plan in _recorded(pipe))


def test_refresh_every_refreshes_inside_the_block():
    model = tiny_model("llada", seed=6)
    with registered(FedRecorder):
        pipe = _pipe(model, [{"name": "dual_cache", "refresh_every": 3}, "fed_recorder"])
        out = pipe.generate([[1, 2, 3]])
    assert [plan.refresh for _, step, plan in _recorded(pipe)] == [step % 3 == 0 for _, step, _ in _recorded(pipe)]
    assert out.stats.plugins["dual_cache"]["refreshes"] == 3 * 3  # steps 0, 3, 6 of 8 per block


# ---- policies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("conf, expected", [
    ([0.5], 1),                           # a single candidate is always committed
    ([0.99, 0.95, 0.9, 0.2, 0.1], 3),     # rank 4 needs 0.8: fails, the 3 before it commit
    ([0.99, 0.4, 0.9], 1),                # rank 2 needs 0.5: fails at once
    ([0.99, 0.9, 0.8, 0.1], 4),           # quirk: the first failing rank is the last one -> all
    ([0.99, 0.98, 0.97], 3),              # nothing fails -> all
    ([0.3, 0.2], 2),                      # n = 2: rank 2 is the last rank, quirk again
])
def test_factor_rule(conf, expected):
    assert factor_count(torch.tensor(conf, dtype=torch.float64), 1.0) == expected


def test_factor_rule_grows_with_factor():
    conf = torch.tensor([0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=torch.float64)
    counts = [factor_count(conf, f) for f in (0.1, 0.5, 1.0, 2.0, 4.0)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == len(conf)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_threshold_one_still_commits_one_per_step_and_zero_commits_the_block(family):
    model = tiny_model(family, seed=7)
    strict = _pipe(model, [{"name": "threshold_decoding", "threshold": 1.0, "quota": "off"}]).generate([[1, 2]])
    assert strict.stats.nfe == GEN["gen_length"] and set(strict.stats.tokens_per_step[0]) == {1}
    loose = _pipe(model, [{"name": "threshold_decoding", "threshold": 0.0}]).generate([[1, 2]])
    assert loose.stats.tokens_per_step[0] == [GEN["block_length"]] * 3


def test_dream_quota_mode_spreads_the_answer_over_the_planned_steps():
    # quota auto = on for Dream with one block: step i considers only base + carried candidates
    model = tiny_model("dream", seed=8)
    gen = {"gen_length": 16, "block_length": 16, "steps": 2}
    quota = _pipe(model, [{"name": "threshold_decoding", "threshold": 0.0}], **gen).generate([[1, 2, 3]])
    assert quota.stats.tokens_per_step[0] == [8, 8]
    plain = _pipe(model, [{"name": "threshold_decoding", "threshold": 0.0, "quota": "off"}], **gen).generate([[1, 2, 3]])
    assert plain.stats.tokens_per_step[0] == [16]


@pytest.mark.parametrize("entry, message", [
    ({"name": "threshold_decoding", "threshold": 1.5}, "threshold = 1.5: must be between 0.0 and 1.0"),
    ({"name": "threshold_decoding", "quota": "maybe"}, "quota = 'maybe': allowed values"),
    ({"name": "factor_decoding", "factor": 0}, "factor = 0.0: must be > 0.0"),
    ({"name": "prefix_cache", "refresh_every": -1}, "refresh_every = -1: must be >= 0"),
    ({"name": "dual_cache", "head_commit": "yes"}, "head_commit = 'yes': allowed values"),
    ({"name": "dual_cache", "freeze_finished_blocks": True}, "unknown key"),
])
def test_bad_options_are_refused_with_the_value(entry, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict({"plugins": [entry]})


# ---- recipes and composition ---------------------------------------------------------------------
@pytest.mark.parametrize("name, plugins", [
    ("prefix_cache", ["prefix_cache"]), ("dual_cache", ["dual_cache"]), ("threshold", ["threshold_decoding"]),
    ("factor", ["factor_decoding"]), ("prefix_cache_threshold", ["prefix_cache", "threshold_decoding"]),
    ("dual_cache_threshold", ["dual_cache", "threshold_decoding"]),
])
def test_shipped_recipe_loads_and_runs(name, plugins):
    recipe = Recipe.from_yaml(RECIPES / f"{name}.yaml")
    assert recipe.name == name and recipe.model == "default"
    assert [p.name for p in recipe.plugins] == plugins
    g = recipe.generation  # the answer length is the model's
    assert (g.gen_length, g.block_length, g.steps, g.temperature) == (None, None, None, 0.0)
    small = recipe.with_overrides(["generation.gen_length=16", "generation.block_length=8", "generation.steps=16"])
    out = Pipeline.from_recipe(small).generate([[3, 5, 6]])  # ids of the embedded model; 4 is its mask
    assert len(out.sequences[0]) == 3 + 16 and 0 not in out.unmask_step[0]


def test_prefix_and_dual_cache_together_are_refused():
    with pytest.raises(ConfigError, match="'prefix_cache' and 'dual_cache' both decide 'row_feed'"):
        Recipe.from_dict({"plugins": ["prefix_cache", "dual_cache"]})
    with pytest.raises(ConfigError, match="'threshold_decoding' and 'factor_decoding' both decide 'commit_policy'"):
        Recipe.from_dict({"plugins": ["threshold_decoding", "factor_decoding"]})


def test_plugins_are_registered_entry_points():
    found = available_plugins()
    for name in ("prefix_cache", "dual_cache", "threshold_decoding", "factor_decoding"):
        assert found[name].name == name and found[name].__module__.startswith("dare_pipeline_plugins.")


def test_cache_and_policy_compose_with_guidance_and_sampling():
    model = tiny_model("llada", seed=9, sharpness=1.0)
    prompts = random_prompts(2, 62, seed=3)
    pipe = _pipe(model, ["dual_cache", "threshold_decoding"], cfg_scale=1.0, temperature=0.8, seed=1)
    a, b = pipe.generate(prompts), pipe.generate(prompts)
    assert a.sequences == b.sequences
    assert all(63 not in seq for seq in a.sequences)  # every mask was filled
