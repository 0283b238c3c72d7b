"""Properties of the reuse plugins (dare_kv, dare_o, ffn_reuse, dllm_cache) on random tiny models of both families.

- Zero threshold is exact: dare_kv / dare_o / ffn_reuse at threshold 0 and dllm_cache with both intervals 1,
  alone and stacked on each Fast-dLLM cache (default options), decode exactly the tokens and commit
  steps of the same recipe without them, over prompt lengths, block lengths, batch sizes 1-3
  (left-padded prompts of different lengths), policies, temperatures and seeds.
- With real reuse (thresholds above 0, dLLM-Cache's default intervals) a batch decodes each prompt
  as alone: padding is never selected and never changes a real row's decision.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.plugin_kit.testing import commit_order, tiny_model

torch.set_num_threads(1)

VOCAB = 64
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ZERO = {"dare_kv": [{"name": "dare_kv", "threshold": 0.0}],
        "dare_o": [{"name": "dare_o", "threshold": 0.0, "exempt_layers": []}],
        "dare_kv+dare_o": [{"name": "dare_kv", "threshold": 0.0}, {"name": "dare_o", "threshold": 0.0}],
        "ffn_reuse": [{"name": "ffn_reuse", "threshold": 0.0}],
        "dare_o+ffn_reuse": [{"name": "dare_o", "threshold": 0.0}, {"name": "ffn_reuse", "threshold": 0.0}],
        "dllm_cache": [{"name": "dllm_cache", "prompt_interval": 1, "response_interval": 1}]}
CACHES = [None, {"name": "prefix_cache"}, {"name": "dual_cache"}]
POLICIES = [None, {"name": "threshold_decoding", "threshold": 0.7}, {"name": "factor_decoding"}]


@functools.cache
def _model(family: str, seed: int, d_model: int):
    return tiny_model(family, seed=seed, d_model=d_model, n_layers=2, n_heads=4, vocab_size=VOCAB)


@st.composite
def setups(draw):
    family = draw(st.sampled_from(["llada", "dream"]))
    model = _model(family, draw(st.integers(0, 3)), draw(st.sampled_from([32, 48])))
    block = draw(st.sampled_from([4, 8]))
    blocks = draw(st.integers(1, 3))
    steps_per_block = draw(st.sampled_from([2, block // 2, block]))
    gen = {"gen_length": block * blocks, "block_length": block, "steps": steps_per_block * blocks,
           "temperature": draw(st.sampled_from([0.0, 0.0, 0.9])), "seed": draw(st.integers(0, 5))}
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
    ids = st.integers(0, VOCAB - 3)
    prompts = [draw(st.lists(ids, min_size=n, max_size=n)) for n in lengths]
    return model, gen, prompts


def _generate(model, gen, plugins, prompts):
    recipe = Recipe.from_dict({"generation": gen, "plugins": [p for p in plugins if p]})
    return Pipeline(model, recipe).generate(prompts)


@st.composite
def zero_stacks(draw):
    reuse = draw(st.sampled_from(sorted(ZERO)))
    cache = None if reuse == "dllm_cache" else draw(st.sampled_from(CACHES))  # dllm_cache refuses row feeders
    return reuse, cache


@SETTINGS
@given(setup=setups(), stack=zero_stacks(), policy=st.sampled_from(POLICIES))
def test_zero_threshold_decodes_the_recipe_without_reuse(setup, stack, policy):
    model, gen, prompts = setup
    reuse, cache = stack
    with_reuse = _generate(model, gen, [cache, policy, *ZERO[reuse]], prompts)
    without = _generate(model, gen, [cache, policy], prompts)
    assert with_reuse.sequences == without.sequences
    assert with_reuse.unmask_step == without.unmask_step
    assert with_reuse.stats.nfe == without.stats.nfe
    for plugin in ZERO[reuse]:
        report = with_reuse.stats.plugins[plugin["name"]]
        assert report["rows_reused"] == 0 and report["rows_eligible"] > 0


REUSING = [[{"name": "dare_kv", "threshold": 0.3}], [{"name": "dare_o", "threshold": 0.3}],
           [{"name": "dare_kv", "threshold": 0.2}, {"name": "dare_o", "threshold": 0.2}],
           [{"name": "ffn_reuse", "threshold": 0.3}],
           [{"name": "dare_o", "threshold": 0.2}, {"name": "ffn_reuse", "threshold": 0.2}],
           [{"name": "dllm_cache", "prompt_interval": 5, "response_interval": 3, "ratio": 0.25}]]


@st.composite
def reusing_stacks(draw):
    reuse = draw(st.sampled_from(REUSING))
    cache = None if reuse[0]["name"] == "dllm_cache" else draw(st.sampled_from(CACHES))
    return reuse, cache


@SETTINGS
@given(setup=setups(), stack=reusing_stacks(), policy=st.sampled_from(POLICIES))
def test_batch_with_reuse_equals_each_prompt_alone(setup, stack, policy):
    model, gen, prompts = setup
    reuse, cache = stack
    plugins = [cache, policy, *reuse]
    batch = _generate(model, gen, plugins, prompts)
    for i, prompt in enumerate(prompts):
        alone = _generate(model, gen, plugins, [prompt])
        assert batch.sequences[i] == alone.sequences[0]
        assert commit_order(batch.unmask_step[i]) == commit_order(alone.unmask_step[0])
