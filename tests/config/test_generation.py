"""Who chooses gen_length, block_length and steps: the command line / generate() keywords, then the
recipe's keys, then the model's generation_config.json (max_new_tokens, steps, block_length), then
the library defaults; steps follow a gen_length set above them, a longer block is cut to it."""

from __future__ import annotations

import json
import shutil

import pytest

from dare_pipeline import Pipeline, Recipe, load_model
from dare_pipeline.config import ConfigError
from dare_pipeline.models.default import EMBEDDED


def lengths(recipe: Recipe) -> tuple:
    g = recipe.generation
    return g.gen_length, g.block_length, g.steps


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


def test_the_embedded_model_chooses_64_tokens_in_blocks_of_32_one_per_step(default_model):
    assert lengths(Pipeline(default_model).recipe) == (64, 32, 64)
    assert lengths(Pipeline(default_model, "recipes/threshold.yaml").recipe) == (64, 32, 64)


def test_the_file_is_hugging_faces_generation_config():
    from transformers import GenerationConfig

    for directory in set(EMBEDDED.values()):
        hf = GenerationConfig.from_pretrained(directory, local_files_only=True)
        assert (hf.max_new_tokens, hf.block_length, hf.steps) == (64, 32, 64)


def test_without_a_max_new_tokens_the_library_defaults_apply(golden_models):
    # the golden Dream checkpoint's generation_config.json has the reference's `steps: 128` and no
    # max_new_tokens: a step count without its length is not taken
    assert golden_models["dream"].generation_config["steps"] == 128
    for model in golden_models.values():
        assert lengths(Pipeline(model).recipe) == (256, 32, 256)
    assert lengths(Recipe().resolved()) == (256, 32, 256)
    assert lengths(Recipe.from_dict({"generation": {"gen_length": 16}}).resolved()) == (16, 16, 16)  # block cut


@pytest.mark.parametrize("generation, expected", [
    ({"gen_length": 128}, (128, 32, 128)),  # the model's steps were for its own length
    ({"gen_length": 16}, (16, 16, 16)),  # and its block of 32 is cut to 16
    ({"steps": 32}, (64, 32, 32)),  # a recipe's steps for the model's length
    ({"block_length": 64}, (64, 64, 64)),
    ({"gen_length": 96, "steps": 48}, (96, 32, 48)),
])
def test_the_recipe_over_the_model(default_model, generation, expected):
    assert lengths(Pipeline(default_model, {"generation": generation}).recipe) == expected


def test_the_command_line_over_the_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("generation: {gen_length: 256, block_length: 32, steps: 128}\n")
    def resolved(*overrides):
        return lengths(Recipe.from_yaml(path, overrides=list(overrides)).resolved())

    assert resolved() == (256, 32, 128)
    # the file's 128 steps were for 256 tokens: 64 tokens decode one per step
    assert resolved("generation.gen_length=64") == (64, 32, 64)
    assert resolved("generation.gen_length=64", "generation.steps=32") == (64, 32, 32)
    assert resolved("generation.gen_length=16") == (16, 16, 16)
    assert resolved("generation.steps=64") == (256, 32, 64)


def test_what_does_not_fit_names_each_value_and_its_source(tmp_path, default_model):
    with pytest.raises(ConfigError) as caught:
        Pipeline(default_model, Recipe.from_dict({"generation": {"gen_length": 48}}, source="r.yaml"))
    assert str(caught.value) == (
        f"r.yaml: generation: gen_length = 48 (r.yaml) is not a multiple of block_length = 32 "
        f"({EMBEDDED['default']}/generation_config.json): give a block_length that divides gen_length, or a "
        f"gen_length that is a multiple of 32")
    with pytest.raises(ConfigError, match=r"steps = 3 \(r.yaml\) is not a multiple of the number of blocks "
                                          r"\(gen_length / block_length = 2; gen_length = 64 \(.*generation_config"):
        Pipeline(default_model, Recipe.from_dict({"generation": {"steps": 3}}, source="r.yaml"))


def test_a_bad_generation_config_names_the_file_and_key(tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(EMBEDDED["default"], directory)
    path = directory / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_new_tokens": "64"}))
    with pytest.raises(ConfigError, match=rf"^{path}: max_new_tokens = '64': expected a whole number >= 1$"):
        Pipeline(load_model(directory))
