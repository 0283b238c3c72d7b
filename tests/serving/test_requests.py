"""max_tokens -> generation length, and which requests may share a batch."""

import attrs
import pytest

from dare_pipeline import Recipe
from dare_pipeline.serving.requests import batch_key, generation_length


@pytest.mark.parametrize("max_tokens, expected", [
    (64, {"gen_length": 64, "block_length": 32, "steps": 64}),  # whole blocks: as asked
    (33, {"gen_length": 64, "block_length": 32, "steps": 64}),  # rounded up to whole blocks
    (1, {"gen_length": 32, "block_length": 32, "steps": 32}),
])
def test_max_tokens_round_up_to_whole_blocks_keeping_steps_per_block(max_tokens, expected):
    assert generation_length(256, 32, 256, max_tokens) == expected
    # a recipe with 16 steps per block of 32 keeps 16 per block
    assert generation_length(256, 32, 128, max_tokens)["steps"] == expected["steps"] // 2


def test_a_one_block_recipe_becomes_one_block_of_max_tokens():
    assert generation_length(256, 256, 128, 40) == {"gen_length": 40, "block_length": 40, "steps": 20}


def test_rows_batch_whatever_their_seed_but_not_with_other_settings():
    """Each row brings its own seed (the generate call takes one per prompt), so greedy and sampled
    rows of any seeds share a batch; another length does not."""
    greedy = Recipe.from_yaml("recipes/baseline.yaml")
    sampled = attrs.evolve(greedy, generation=attrs.evolve(greedy.generation, temperature=0.7))
    for recipe in (greedy, sampled):
        other_seed = attrs.evolve(recipe, generation=attrs.evolve(recipe.generation, seed=7))
        assert batch_key(recipe, "llada") == batch_key(other_seed, "llada")
    assert batch_key(greedy, "llada") != batch_key(sampled, "llada")
    longer = attrs.evolve(greedy, generation=attrs.evolve(greedy.generation, gen_length=512, steps=512))
    assert batch_key(greedy, "llada") != batch_key(longer, "llada")


def test_greedy_rows_batch_whatever_their_filters_where_filters_change_nothing():
    greedy = Recipe.from_yaml("recipes/baseline.yaml")
    nucleus = attrs.evolve(greedy, generation=attrs.evolve(greedy.generation, top_p=0.9, top_k=5))
    # a LLaDA-family model takes the argmax and ranks by its own softmax: the filters change nothing
    assert batch_key(greedy, "llada") == batch_key(nucleus, "llada")
    # a Dream-family model ranks by the filtered distribution, and sampling draws from it
    assert batch_key(greedy, "dream") != batch_key(nucleus, "dream")
    sampled, sampled_nucleus = (attrs.evolve(r, generation=attrs.evolve(r.generation, temperature=0.7))
                                for r in (greedy, nucleus))
    assert batch_key(sampled, "llada") != batch_key(sampled_nucleus, "llada")
