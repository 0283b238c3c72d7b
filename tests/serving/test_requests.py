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


def test_greedy_rows_batch_whatever_their_seed_sampled_rows_only_with_their_own():
    greedy = Recipe.from_yaml("recipes/baseline.yaml")
    other_seed = attrs.evolve(greedy, generation=attrs.evolve(greedy.generation, seed=7))
    assert batch_key(greedy, sampling=False) == batch_key(other_seed, sampling=False)
    assert batch_key(greedy, sampling=True) != batch_key(other_seed, sampling=True)
    longer = attrs.evolve(greedy, generation=attrs.evolve(greedy.generation, gen_length=512, steps=512))
    assert batch_key(greedy, sampling=False) != batch_key(longer, sampling=False)
