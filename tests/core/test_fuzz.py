"""Bounded fuzzing (a few seconds each, derandomized so CI is repeatable):

- `Recipe.from_dict` (and `--set` overrides) on random YAML-like data over the real keys, plugin
  names and options: it returns a recipe that round-trips through `to_dict`, or raises ConfigError;
  never another exception.
- `Pipeline.generate` on the golden tiny LLaDA and Dream with random plugin stacks, options,
  generation settings and prompt ids: bad prompts raise ConfigError (PromptError), and every prompt
  decodes to the same tokens in the same commit order alone as in its batch.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.plugin_kit.testing import commit_order

SETTINGS = {"deadline": None, "derandomize": True, "phases": [Phase.explicit, Phase.generate],
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}

# ---- Recipe.from_dict --------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.integers(), st.floats(allow_nan=True),
                    st.sampled_from([0, 1, 16, 32, 0.5, 1e-3, "1e-3", "", "cpu", "cuda", "gpu", "linear",
                                     "timesteps", "low_confidence", "random", "margin", "auto", "eager",
                                     "compiled", ".nan", "nan", "inf", 10**400, -(10**400)]),
                    st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
GENERATION_KEYS = ["gen_length", "block_length", "steps", "temperature", "top_p", "top_k", "remasking", "confidence",
                   "schedule", "timestep_eps", "cfg_scale", "stop", "seed", "max_steps_per_block", "colour"]
TOP_KEYS = ["name", "description", "model", "dtype", "device", "execution", "generation", "plugins", "other"]
PLUGIN_NAMES = ["baseline", "dare_kv", "dare_o", "dllm_cache", "dual_cache", "factor_decoding", "prefix_cache",
                "threshold_decoding", "guided_diffusion", "no_such_plugin"]
OPTION_NAMES = ["threshold", "exempt_layers", "refresh_every", "recompute_at_refresh", "recompute_block", "shadow",
                "row_budget", "prompt_interval", "response_interval", "ratio", "head_commit", "factor", "quota",
                "freeze_finished_blocks", "guide", "device", "accept", "top_k", "min_prob", "verify_window",
                "also_commit_above", "stop_at_eos", "name"]

# numbers at the edges of what an option takes (and strings that look like numbers)
EDGE_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), -1, 0, 1, 2**63, True, 1e-3, "1e-3",
                                "1E5", 1e308, -0.0, 5e-324])
plugin_entries = st.one_of(
    st.sampled_from(PLUGIN_NAMES),
    st.builds(lambda name, options: {"name": name, **options}, st.sampled_from(PLUGIN_NAMES),
              st.dictionaries(st.sampled_from(OPTION_NAMES[:-1]), EDGE_NUMBERS | VALUES, max_size=3)),
    VALUES)
recipes = st.fixed_dictionaries({}, optional={
    "name": VALUES, "model": VALUES, "dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "fp8"]), VALUES),
    "device": st.one_of(st.sampled_from(["cpu", "cuda", "gpu", "cuda:7", "meta"]), VALUES),
    "generation": st.one_of(st.dictionaries(st.sampled_from(GENERATION_KEYS), EDGE_NUMBERS | VALUES, max_size=5),
                            VALUES),
    "execution": st.one_of(st.dictionaries(st.sampled_from(["mode", "backend", "fullgraph", "x"]), VALUES,
                                           max_size=2), VALUES),
    "plugins": st.one_of(st.lists(plugin_entries, max_size=3), VALUES),
    "other": VALUES})
override_keys = st.one_of(
    st.sampled_from([f"generation.{k}" for k in GENERATION_KEYS] + TOP_KEYS + ["generation", "plugins.x"]),
    st.builds(lambda p, o: f"plugins.{p}.{o}", st.sampled_from(PLUGIN_NAMES), st.sampled_from(OPTION_NAMES)),
    st.text(max_size=10))
override_values = st.one_of(st.sampled_from(["1", "0", "-1", "1e-3", ".nan", "[1", "{a: 1}", "'x'", "", "[]", "~",
                                             "true", "*x", "!!python/object:os.system", "0.5", "cuda"]),
                            st.text(max_size=8))
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values) | st.text(max_size=6),
                     max_size=2)


@settings(max_examples=300, **SETTINGS)
@given(data=st.one_of(recipes, VALUES), sets=overrides)
@example(data={"generation": {"temperature": 10**400}}, sets=[])
@example(data={"generation": {"cfg_scale": math.nan}}, sets=["generation.temperature=.inf"])
@example(data={"plugins": {"name": "dllm_cache"}}, sets=["plugins.dllm_cache.ratio=0.5"])
@example(data={"plugins": [{"name": "dare_kv", "threshold": -math.inf}]}, sets=["device=gpu"])
@example(data={"generation": {"timestep_eps": "1e-3"}}, sets=["generation.stop=[1", "plugins=x"])
def test_recipe_from_dict_gives_a_recipe_or_a_config_error(data, sets):
    try:
        recipe = Recipe.from_dict(data, source="fuzz.yaml", overrides=sets)
    except ConfigError as error:
        assert str(error).startswith("fuzz.yaml"), error
        return
    again = Recipe.from_dict(recipe.to_dict(), source="fuzz.yaml")
    assert again == recipe
    floats = [recipe.generation.temperature, recipe.generation.top_p, recipe.generation.cfg_scale,
              recipe.generation.timestep_eps]
    assert all(math.isfinite(f) for f in floats)


# ---- Pipeline.generate: alone == batched --------------------------------------------------------

OPTIONS = {
    "threshold_decoding": {"threshold": st.floats(0.3, 1.0)},
    "factor_decoding": {"factor": st.floats(0.5, 3.0)},
    "prefix_cache": {"refresh_every": st.integers(0, 3)},
    "dual_cache": {"refresh_every": st.integers(0, 3)},
    "dare_kv": {"threshold": st.floats(0.0, 0.3), "refresh_every": st.integers(0, 3)},
    "dare_o": {"threshold": st.floats(0.0, 0.3), "refresh_every": st.integers(0, 3)},
    "dllm_cache": {"prompt_interval": st.integers(1, 8), "response_interval": st.integers(1, 6),
                   "ratio": st.sampled_from([0.0, 0.25, 0.5, 1.0])},
}


@st.composite
def stacks(draw):
    """Up to one plugin per role (policy, row feeder, reuse); options from their valid ranges."""
    policy = draw(st.sampled_from([None, "threshold_decoding", "factor_decoding"]))
    feeder = draw(st.sampled_from([None, "prefix_cache", "dual_cache"]))
    reuse = draw(st.sampled_from([[], ["dare_kv"], ["dare_o"], ["dare_kv", "dare_o"], ["dllm_cache"]]))
    names = [n for n in (policy, feeder, *reuse) if n]
    return [{"name": n, **{k: draw(v) for k, v in OPTIONS[n].items() if draw(st.booleans())}} for n in names]


@st.composite
def settings_and_prompts(draw, vocab: int, mask: int):
    block = draw(st.sampled_from([8, 16]))
    blocks = draw(st.integers(1, 2))
    gen = {"gen_length": block * blocks, "block_length": block,
           "steps": draw(st.sampled_from([block // 2, block])) * blocks,
           "temperature": draw(st.sampled_from([0.0, 0.0, 0.8])), "seed": draw(st.integers(0, 3)),
           "top_p": draw(st.sampled_from([1.0, 1.0, 0.9])), "top_k": draw(st.sampled_from([0, 0, 5]))}
    ids = st.integers(0, vocab - 1).filter(lambda t: t != mask)
    prompts = draw(st.lists(st.lists(ids, min_size=1, max_size=9), min_size=2, max_size=4))
    return gen, prompts


@settings(max_examples=12, **SETTINGS)
@given(family=st.sampled_from(["llada", "dream"]), stack=stacks(), data=st.data())
def test_each_prompt_decodes_alone_as_in_a_batch(golden_models, family, stack, data):
    model = golden_models[family]
    cfg = model.config
    gen, prompts = data.draw(settings_and_prompts(cfg.vocab_size, cfg.mask_token_id))
    try:
        pipe = Pipeline(model, {"generation": gen, "plugins": stack})
    except ConfigError:  # a combination the plugins declare they cannot stack
        assume(False)
    batched = pipe.generate(prompts)
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt])
        assert alone.sequences[0] == batched.sequences[i], (i, prompt)
        # the commit order (a prompt that waits for its batch under a variable-step policy sees forwards
        # that commit nothing for it)
        assert commit_order(alone.unmask_step[0]) == commit_order(batched.unmask_step[i]), (i, prompt)


@settings(max_examples=40, **SETTINGS)
@given(family=st.sampled_from(["llada", "dream"]),
       prompts=st.one_of(st.lists(st.lists(st.integers(-2, 600) | st.sampled_from([500, 511, 1.5, True, "3", None]),
                                           max_size=4), max_size=3),
                         st.text(max_size=4), st.none(), st.integers()))
def test_random_prompt_values_decode_or_give_a_config_error(golden_models, family, prompts):
    model = golden_models[family]
    pipe = Pipeline(model, {"generation": {"gen_length": 8, "block_length": 8, "steps": 4}})
    try:
        out = pipe.generate(prompts)
    except ConfigError:  # PromptError among them
        return
    flat = [t for p in out.sequences for t in p]
    assert all(isinstance(t, int) for t in flat)
