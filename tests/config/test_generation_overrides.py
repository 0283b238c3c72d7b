"""`Pipeline.generate(..., **overrides)` and `generate(model, prompts, recipe, **overrides)` check their
keyword overrides exactly as a recipe's `generation:` keys; `max_new_tokens` means `gen_length`."""

from __future__ import annotations

import math

import pytest

from dare_pipeline import Pipeline, generate
from dare_pipeline.config import ConfigError

RECIPE = {"generation": {"gen_length": 32, "block_length": 16, "steps": 32}}


@pytest.fixture(scope="module")
def pipe(golden_models):
    return Pipeline(golden_models["llada"], RECIPE)


@pytest.mark.parametrize("overrides, problem", [
    ({"steps": True}, r"generation\.steps = True: expected int, got bool"),
    ({"stop": "wiz"}, r"generation\.stop = 'wiz': expected a list"),
    ({"seed": "abc"}, r"generation\.seed = 'abc': expected int, got str"),
    ({"seed": 1.5}, r"generation\.seed = 1.5: expected int"),
    ({"temperature": math.nan}, r"generation\.temperature = nan: expected a finite number"),
    ({"cfg_scale": math.inf}, r"generation\.cfg_scale = inf: expected a finite number"),
    ({"temperature": -1.0}, r"temperature = -1.0: must be >= 0.0"),
    ({"remasking": "best"}, r"remasking = 'best': allowed values"),
    ({"gen_length": 17}, r"gen_length = 17 \(generate\(\) keyword arguments\) is not a multiple of block_length "
                         r"= 16 \(<dict>\)"),
    ({"steps": 25}, r"steps = 25 \(generate\(\) keyword arguments\) is not a multiple of the number of blocks"),
    ({"gen_length": 16, "block_length": 32}, r"gen_length \(16\) must be a multiple of block_length \(32\)"),
    ({"colour": 1}, r"generation\.colour: unknown key; allowed keys: \['block_length'"),
])
def test_bad_keyword_overrides_are_config_errors(pipe, overrides, problem):
    with pytest.raises(ConfigError, match=rf"<dict> \(generate\(\) keyword arguments\): .*{problem}"):
        pipe.generate([[1, 2, 3]], **overrides)


def test_one_shot_generate_checks_them_too(golden_models):
    with pytest.raises(ConfigError, match=r"generation\.steps = True"):
        generate(golden_models["llada"], [[1, 2, 3]], RECIPE, steps=True)


def test_good_overrides_apply(pipe):
    out = pipe.generate([[1, 2, 3]], gen_length=16, steps=8, stop=["x"], seed=3, temperature=0.5)
    assert len(out.sequences[0]) == 3 + 16 and out.stats.nfe == 8
    assert pipe.recipe.generation.gen_length == 32  # the recipe is unchanged


def test_max_new_tokens_means_gen_length(pipe):
    by_hf_name = pipe.generate([[1, 2, 3]], max_new_tokens=16, steps=16)
    assert by_hf_name.sequences == pipe.generate([[1, 2, 3]], gen_length=16, steps=16).sequences
    assert len(by_hf_name.sequences[0]) == 3 + 16
    with pytest.raises(ConfigError, match=r"gen_length = 24 \(generate\(\) keyword arguments\) is not a multiple"):
        pipe.generate([[1, 2, 3]], max_new_tokens=24)  # checked as gen_length
    with pytest.raises(ConfigError, match="max_new_tokens and gen_length both given; max_new_tokens means gen_length"):
        pipe.generate([[1, 2, 3]], max_new_tokens=16, gen_length=16)


def test_steps_follow_a_new_gen_length_and_a_longer_block_is_cut_to_it(golden_models):
    pipe = Pipeline(golden_models["llada"], {"generation": {"gen_length": 32, "block_length": 16, "steps": 16}})
    blocks = []
    # the recipe's 16 steps were for 32 tokens: 64 tokens decode one per step, in the recipe's blocks
    out = pipe.generate([[1, 2, 3]], gen_length=64, step_callback=lambda event: blocks.append(event.block))
    assert len(out.sequences[0]) == 3 + 64 and out.stats.nfe == 64 and sorted(set(blocks)) == [0, 1, 2, 3]
    assert pipe.generate([[1, 2, 3]], gen_length=64, steps=32).stats.nfe == 32  # unless given with it
    # 8 tokens: the recipe's block of 16 is cut to 8 (one block)
    blocks.clear()
    out = pipe.generate([[1, 2, 3]], gen_length=8, step_callback=lambda event: blocks.append(event.block))
    assert len(out.sequences[0]) == 3 + 8 and out.stats.nfe == 8 and set(blocks) == {0}
