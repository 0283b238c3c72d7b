"""Properties of the Fast-dLLM caches and policies on random tiny models of both families.

- A cache refreshed at every step (`refresh_every: 1`, no Dream head commit) is the no-cache decoder:
  identical tokens and commit steps.
- A batch of left-padded prompts of different lengths decodes each prompt exactly as alone, for
  every cache x policy combination, greedy or sampled. Within a batch a prompt whose block is done
  waits (commits nothing) for the others, so its forward numbers shift: the commit order is compared
  as the sequence of per-forward commit sets, forwards that commit nothing left out.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.plugin_kit.testing import commit_order, tiny_model

torch.set_num_threads(1)

VOCAB = 64  # tiny_model's default: ids 62 (EOS/pad) and 63 (mask) are special
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EXACT_CACHES = [{"name": "prefix_cache"}, {"name": "dual_cache"}]
# FreeCache's frozen blocks are approximate by design (never refreshed): batch invariance only
CACHES = EXACT_CACHES + [{"name": "prefix_cache", "freeze_finished_blocks": True}]
POLICIES = [None, {"name": "threshold_decoding", "threshold": 0.7}, {"name": "factor_decoding", "factor": 1.0},
            {"name": "threshold_decoding", "threshold": 0.8, "quota": "on"}]


@functools.cache
def _model(family: str, seed: int, d_model: int):
    return tiny_model(family, seed=seed, d_model=d_model, n_layers=2, n_heads=4, vocab_size=VOCAB)


@st.composite
def setups(draw):
    family = draw(st.sampled_from(["llada", "dream"]))
    model = _model(family, draw(st.integers(0, 3)), draw(st.sampled_from([32, 48, 64])))
    block = draw(st.sampled_from([4, 8]))
    blocks = draw(st.integers(1, 3))
    steps_per_block = draw(st.sampled_from([1, 2, block // 2, block]))
    gen = {"gen_length": block * blocks, "block_length": block, "steps": steps_per_block * blocks,
           "temperature": draw(st.sampled_from([0.0, 0.0, 0.9])), "seed": draw(st.integers(0, 5))}
    if family == "dream" and draw(st.booleans()):
        gen.update(schedule="timesteps", confidence="neg_entropy")
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
    ids = st.integers(0, VOCAB - 3)
    prompts = [draw(st.lists(ids, min_size=n, max_size=n)) for n in lengths]
    return model, gen, prompts


def _generate(model, gen, plugins, prompts):
    recipe = Recipe.from_dict({"generation": gen, "plugins": [p for p in plugins if p]})
    return Pipeline(model, recipe).generate(prompts)


@SETTINGS
@given(setup=setups(), cache=st.sampled_from(EXACT_CACHES), policy=st.sampled_from(POLICIES))
def test_cache_refreshed_every_step_is_the_no_cache_decoder(setup, cache, policy):
    model, gen, prompts = setup
    exact = {**cache, "refresh_every": 1, "head_commit": "off"}
    cached = _generate(model, gen, [exact, policy], prompts)
    plain = _generate(model, gen, [policy], prompts)
    assert cached.sequences == plain.sequences
    assert cached.unmask_step == plain.unmask_step
    assert cached.stats.nfe == plain.stats.nfe
    report = cached.stats.plugins[cache["name"]]
    assert report["refreshes"] == cached.stats.nfe


@SETTINGS
@given(setup=setups(), cache=st.sampled_from(CACHES + [None]), policy=st.sampled_from(POLICIES))
def test_batch_equals_each_prompt_alone(setup, cache, policy):
    model, gen, prompts = setup
    batch = _generate(model, gen, [cache, policy], prompts)
    for i, prompt in enumerate(prompts):
        alone = _generate(model, gen, [cache, policy], [prompt])
        assert batch.sequences[i] == alone.sequences[0]
        assert commit_order(batch.unmask_step[i]) == commit_order(alone.unmask_step[0])
