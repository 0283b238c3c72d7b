import json

import attrs
import pytest
import torch

from dare_pipeline import load_model
from dare_pipeline.models import DiffusionTransformer, ModelConfig
from dare_pipeline.models.saving import save_checkpoint
from dare_pipeline.models.tokenizer import build_tokenizer


def _tiny(family: str, **kw) -> DiffusionTransformer:
    dream = family == "dream"
    cfg = ModelConfig(family=family, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if dream else 4, ffn_hidden=48,
                      vocab_size=101, embedding_size=101 if dream else 128, rope_theta=10000.0,
                      max_sequence_length=256, qkv_bias=dream, logits_shift=dream, mask_token_id=4, eos_token_id=2,
                      pad_token_id=0, bos_token_id=1, **kw)
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_identical_logits(tmp_path, family, tied):
    model = _tiny(family, tie_word_embeddings=tied)
    out = save_checkpoint(model, tmp_path / "ckpt", tokenizer=build_tokenizer())
    loaded = load_model(out)
    # the tokenizer's <|eot|> (id 3) becomes an extra stop id on load; everything else round-trips
    assert attrs.evolve(loaded.config, extra_stop_ids=()) == model.config
    assert loaded.config.extra_stop_ids == (3,)
    ids = torch.randint(5, 101, (2, 17))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), loaded(ids, attention_mask=mask))
    assert loaded.tokenizer is not None and loaded.tokenizer("Q: 1")["input_ids"] == [55, 32, 6, 23]


def test_config_fields(tmp_path):
    raw = json.loads((save_checkpoint(_tiny("llada"), tmp_path / "a") / "config.json").read_text())
    assert raw["model_type"] == "llada" and raw["architectures"] == ["LLaDAModelLM"]
    assert (raw["d_model"], raw["mlp_hidden_size"], raw["embedding_size"], raw["block_type"]) == (32, 48, 128, "llama")
    assert raw["rope"] is True and raw["alibi"] is False and raw["activation_type"] == "silu"
    raw = json.loads((save_checkpoint(_tiny("dream"), tmp_path / "b") / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["architectures"] == ["DreamModel"]
    assert (raw["hidden_size"], raw["num_key_value_heads"], raw["intermediate_size"]) == (32, 2, 48)


def test_bf16_storage_and_atomic_replace(tmp_path):
    model = _tiny("llada")
    target = save_checkpoint(model, tmp_path / "ckpt")
    save_checkpoint(model, target, dtype="bfloat16")  # replaces the existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(target)
    assert loaded.tokenizer is None
    ref = model.embed.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.embed.weight, ref)


def test_a_replace_that_fails_leaves_the_previous_checkpoint_in_place(tmp_path, monkeypatch):
    import os

    from dare_pipeline.models import saving

    model = _tiny("llada")
    target = save_checkpoint(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    replace = os.replace

    def fails_into_place(src, dst):
        if str(src).startswith(str(tmp_path / ".ckpt.tmp-")):
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", fails_into_place)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, target, dtype="bfloat16")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_dream_needs_qkv_bias(tmp_path):
    nobias = DiffusionTransformer(attrs.evolve(_tiny("dream").config, qkv_bias=False))
    with pytest.raises(ValueError, match="bias"):
        save_checkpoint(nobias, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory


def test_generation_config_carries_the_answer_length(tmp_path):
    """What a recipe may leave to the model (max_new_tokens, steps, block_length) survives a save,
    and `generation=` adds to it; the special token ids are always the config's."""
    bare = load_model(save_checkpoint(_tiny("llada"), tmp_path / "bare"))
    assert bare.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "mask_token_id": 4, "pad_token_id": 0}
    lengths = {"max_new_tokens": 64, "block_length": 32, "steps": 64}
    saved = load_model(save_checkpoint(bare, tmp_path / "with", generation=lengths))
    assert saved.generation_config == {**bare.generation_config, **lengths}
    again = load_model(save_checkpoint(saved, tmp_path / "again", generation={"steps": 32}))
    assert again.generation_config == {**saved.generation_config, "steps": 32}
    shipped = load_model("default")
    assert {k: shipped.generation_config[k] for k in lengths} == lengths
