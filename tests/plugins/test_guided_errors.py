"""Guided diffusion refuses what cannot work, in one clear line each: a guide whose vocabulary differs
from the diffusion model's (naming both checkpoints and the first difference; only the diffusion
model's own special tokens may be missing, as Dream's `<|mask|>` from Qwen2.5), a missing or broken
guide directory, a guide on another device than the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from guided_helpers import edit_vocab, save_guide

from dare_pipeline import Pipeline, Recipe, load_model
from dare_pipeline.config import ConfigError
from dare_pipeline.plugin_kit.testing import tiny_model

torch.set_num_threads(1)

NAME = "guided_diffusion"
GEN = {"gen_length": 8, "block_length": 8, "steps": 8}
PROMPT = ["Q: reverse abc\nA: "]


@pytest.fixture(scope="module")
def model():
    return load_model("default-dream")


def _decode(model, guide, prompts=PROMPT, **options):
    pipe = Pipeline(model, Recipe.from_dict({"generation": GEN, "plugins": [{"name": NAME, "guide": str(guide),
                                                                            **options}]}))
    return pipe.generate(prompts)


def _error(model, guide, prompts=PROMPT, **options) -> str:
    with pytest.raises(ConfigError) as info:
        _decode(model, guide, prompts, **options)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_same_tokenizer_is_accepted(model, tmp_path):
    out = _decode(model, save_guide(tmp_path / "g", "qwen2"))
    assert out.stats.plugins[NAME]["guide"] == str(tmp_path / "g")


def test_swapped_ids_are_refused_with_the_first_difference(model, tmp_path):
    guide = save_guide(tmp_path / "g")

    def swap(vocab):
        vocab["b"], vocab["a"] = vocab["a"], vocab["b"]

    edit_vocab(guide, swap)
    message = _error(model, guide)
    a = model.tokenizer.get_vocab()["a"]
    assert message == (f"plugins.{NAME}.guide: {guide}: its tokenizer differs from {model.source}'s: "
                       f"'a' is id {a} there, {a + 1} here")


def test_a_missing_ordinary_token_is_refused(model, tmp_path):
    guide = save_guide(tmp_path / "g")
    edit_vocab(guide, lambda vocab: vocab.pop("z"))
    assert _error(model, guide).endswith(f"'z' (id {model.tokenizer.get_vocab()['z']} there) is missing here")


def test_a_missing_special_token_of_the_diffusion_model_is_allowed(model, tmp_path):
    """As Dream's `<|mask|>` and `<|beginoftext|>` are missing from Qwen2.5's tokenizer."""
    guide = save_guide(tmp_path / "g", "qwen2")
    edit_vocab(guide, lambda vocab: vocab.pop("<|mask|>"))
    assert "<|mask|>" not in json.loads((guide / "tokenizer.json").read_text())["model"]["vocab"]
    assert _decode(model, guide).sequences


def test_an_extra_token_of_the_guide_is_refused(model, tmp_path):
    guide = save_guide(tmp_path / "g", vocab_size=102)
    edit_vocab(guide, lambda vocab: vocab.update({"<|extra|>": 101}))
    assert _error(model, guide).endswith("'<|extra|>' (id 101 here) is not in its vocabulary")


def test_a_tokenizer_on_one_side_only_is_refused(model, tmp_path):
    guide = save_guide(tmp_path / "g", tokenizer=False)
    assert _error(model, guide) == (f"plugins.{NAME}.guide: {guide}: its vocabulary cannot be checked against "
                                    f"{model.source}'s: {guide} has no tokenizer files")
    tiny = tiny_model("llada", vocab_size=101)
    assert _error(tiny, save_guide(tmp_path / "h"), [[1, 2, 3]]).endswith(f"{tiny.source} has no tokenizer files")


def test_without_tokenizers_the_vocabulary_sizes_must_match(tmp_path):
    tiny = tiny_model("dream", vocab_size=64)
    guide = save_guide(tmp_path / "g", "qwen2", vocab_size=80, tokenizer=False)
    assert _error(tiny, guide, [[1, 2, 3]]) == (f"plugins.{NAME}.guide: {guide}: vocab_size 80 differs from {tiny.source}'s 64 "
                                   f"(neither has a tokenizer to compare)")
    assert _decode(tiny, save_guide(tmp_path / "h", vocab_size=64, tokenizer=False), prompts=[[1, 2, 3]]).sequences


def test_a_missing_directory_is_refused_at_recipe_load(tmp_path):
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({"plugins": [{"name": NAME, "guide": str(tmp_path / "nowhere")}]}, source="r.yaml")
    assert str(info.value) == (f"r.yaml: plugins[0]: guide = '{tmp_path / 'nowhere'}': not a directory (a local "
                               f"Hugging Face causal-LM directory, or 'default' for the embedded guide)")


def test_a_directory_removed_after_the_recipe_loaded_is_refused_at_load(model, tmp_path):
    guide = save_guide(tmp_path / "g")
    recipe = Recipe.from_dict({"generation": GEN, "plugins": [{"name": NAME, "guide": str(guide)}]})
    shutil.rmtree(guide)
    with pytest.raises(ConfigError, match=f"guide = '{guide}': no config.json in {guide}"):
        Pipeline(model, recipe).generate(PROMPT)


def test_broken_weights_are_refused_naming_the_directory(model, tmp_path):
    guide = save_guide(tmp_path / "g")
    (guide / "model.safetensors").write_bytes(b"not safetensors")
    message = _error(model, guide)
    assert message.startswith(f"plugins.{NAME}.guide = '{guide}': cannot load a causal LM from {guide} (")


def test_a_diffusion_checkpoint_is_no_guide(model):
    guide = Path(model.source)  # model_type Dream: transformers knows no causal LM of that type
    assert _error(model, guide).startswith(f"plugins.{NAME}.guide = '{guide}': cannot load a causal LM from {guide} (")


def test_a_guide_on_another_device_is_refused(model, tmp_path):
    guide = save_guide(tmp_path / "g")
    assert _error(model, guide, device="cuda:0") == (
        f"plugins.{NAME}.device = 'cuda:0': the guide must run on the diffusion model's device (cpu); "
        f"leave it unset or set it to 'cpu'")
    assert _decode(model, guide, device="cpu").sequences


def test_a_guide_without_the_llama_layout_is_refused(model, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    guide = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=1, n_head=2)).save_pretrained(guide)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(model.source) / name, guide / name)
    assert "the guide must be a decoder of the Llama layout" in _error(model, guide)
