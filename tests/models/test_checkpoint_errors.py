"""Broken checkpoints give one clear error naming the file and the problem: built by copying the
golden checkpoint (or the embedded model, for tokenizer files) into tmp_path and corrupting it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dare_pipeline import load_model
from dare_pipeline.models import CheckpointError
from dare_pipeline.models.default import resolve_model_path


@pytest.fixture
def llada(golden_dir, tmp_path):
    dst = tmp_path / "llada"
    shutil.copytree(golden_dir / "llada", dst)
    return dst


@pytest.fixture
def with_tokenizer(tmp_path):
    dst = tmp_path / "default"
    shutil.copytree(resolve_model_path("default"), dst)
    return dst


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_safetensors_names_the_file(llada, damage):
    path = llada / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 64}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(llada)


@pytest.mark.parametrize("text", ["[1, 2]", '"llada"', "null"])
def test_config_json_that_is_not_an_object(llada, text):
    (llada / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
        load_model(llada)


def test_config_json_that_is_not_utf8(llada):
    (llada / "config.json").write_bytes(b'{"model_type": "llada\xff"}')
    with pytest.raises(CheckpointError, match=r"config\.json: not UTF-8 text"):
        load_model(llada)


@pytest.mark.parametrize("text, problem", [("[]", "expected a JSON object"),
                                           ('{"weight_map": "model.safetensors"}', "no 'weight_map' object"),
                                           ('{"weight_map": {"a": 1}}', "no 'weight_map' object"),
                                           ("{not json", "not valid JSON")])
def test_index_that_is_not_a_weight_map(llada, text, problem):
    (llada / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: {problem}"):
        load_model(llada)


@pytest.mark.parametrize("key, value, problem", [
    ("mask_token_id", 512, "out of range; allowed 0 to 511"), ("mask_token_id", -1, "out of range"),
    ("mask_token_id", "511", "expected an integer token id"), ("mask_token_id", 1.5, "expected an integer"),
    ("eos_token_id", 10**6, "out of range"), ("eos_token_id", "eos", "expected an integer"),
    ("pad_token_id", -3, "out of range"), ("pad_token_id", True, "expected an integer"),
    ("bos_token_id", [1], "expected an integer")])
def test_special_token_ids_out_of_range_or_of_the_wrong_type(llada, key, value, problem):
    _edit_config(llada, **{key: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {key} = .*{problem}"):
        load_model(llada)


def test_tokenizer_larger_than_the_embedding(with_tokenizer):
    _edit_config(with_tokenizer, vocab_size=64, embedding_size=64)
    with pytest.raises(CheckpointError, match="the tokenizer has 101 tokens but the embedding has 64 rows"):
        load_model(with_tokenizer)


@pytest.mark.parametrize("damage", ["garbage tokenizer.json", "tokenizer.json not a tokenizer",
                                    "tokenizer.json missing", "garbage tokenizer_config.json"])
def test_corrupt_or_missing_tokenizer_files(with_tokenizer, damage):
    if damage == "garbage tokenizer.json":
        (with_tokenizer / "tokenizer.json").write_bytes(b"\x00\xff garbage")
    elif damage == "tokenizer.json not a tokenizer":
        (with_tokenizer / "tokenizer.json").write_text('{"version": "1.0"}')
    elif damage == "tokenizer.json missing":
        (with_tokenizer / "tokenizer.json").unlink()
    else:
        (with_tokenizer / "tokenizer_config.json").write_text("{broken")
    expected = (r"default/tokenizer_config.json: not valid JSON" if damage == "garbage tokenizer_config.json"
                else r"default: the tokenizer files \[.*\] cannot be loaded")
    with pytest.raises(CheckpointError, match=expected):
        load_model(with_tokenizer)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_tensor_where_a_float_belongs(llada, dtype):
    name = "model.transformer.blocks.0.q_proj.weight"
    _rewrite_weights(llada, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} has dtype "
                                              rf"{str(dtype).removeprefix('torch.')}; expected a floating-point"):
        load_model(llada)


def test_the_same_tensor_in_two_shards(llada):
    tensors = load_file(llada / "model.safetensors")
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:3]}, llada / "model-extra.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor {names[0]} is also in .*model(-extra)?\.safetensors"):
        load_model(llada)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named_at_load(llada, value):
    name = "model.transformer.blocks.2.ff_out.weight"

    def poison(tensors):
        tensors[name][3, 5] = value
        tensors[name][0, 0] = value

    _rewrite_weights(llada, poison)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} has 2 non-finite values"):
        load_model(llada)


def test_weights_that_overflow_the_chosen_dtype(llada):
    name = "model.transformer.wte.weight"
    _rewrite_weights(llada, lambda t: t[name].__setitem__((1, 1), 1e6))
    load_model(llada)  # finite in float32
    with pytest.raises(CheckpointError, match=rf"tensor {name} has 1 non-finite values.*overflow the chosen dtype"):
        load_model(llada, dtype="float16")


def test_a_large_tensor_is_checked_in_chunks(monkeypatch, llada):
    """The finiteness check reads bounded chunks: a NaN in the last chunk is still found."""
    from dare_pipeline.models import checkpoint_checks

    monkeypatch.setattr(checkpoint_checks, "_FINITE_CHUNK", 1000)
    name = "model.transformer.blocks.0.up_proj.weight"
    _rewrite_weights(llada, lambda t: t[name].__setitem__((-1, -1), float("nan")))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has 1 non-finite"):
        load_model(llada)


def test_the_command_line_prints_one_line(llada, capsys):
    from dare_pipeline.cli import main

    name = "model.transformer.blocks.1.q_proj.weight"
    _rewrite_weights(llada, lambda t: t[name].__setitem__((0, 0), float("nan")))
    code = main(["generate", "--recipe", "recipes/baseline.yaml", "--model", str(llada), "--prompt-ids", "1,2",
                 "--set", "generation.gen_length=32", "--set", "generation.steps=32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"dare-pipeline: error: {llada / 'model.safetensors'}: tensor {name} has 1 non-finite")
