"""Loading checkpoints: sharded and single files, dtypes, and clear errors for broken directories."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dare_pipeline import load_model
from dare_pipeline.models import CheckpointError


def _copy(golden_dir, tmp_path, fam="llada"):
    dst = tmp_path / fam
    shutil.copytree(golden_dir / fam, dst)
    return dst


def test_loads_without_materialising_random_weights(golden_dir):
    model = load_model(golden_dir / "llada")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.config.family == "llada" and model.config.n_layers == 4
    assert model.tokenizer is None  # the golden checkpoints have no tokenizer files


def test_sharded_checkpoint_equals_single_file(golden_dir, tmp_path):
    src = _copy(golden_dir, tmp_path)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, src / shard)
        weight_map.update({k: shard for k in keys})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.arange(20)[None]
    assert torch.equal(load_model(src)(ids), load_model(golden_dir / "llada")(ids))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads(golden_dir, dtype):
    model = load_model(golden_dir / "dream", dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    full = load_model(golden_dir / "dream")
    ids = torch.arange(24)[None]
    # same argmax on most rows: a semantic error would change nearly all of them
    agree = (model(ids).float().argmax(-1) == full(ids).argmax(-1)).float().mean()
    assert agree > 0.8


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")


def test_missing_config(golden_dir, tmp_path):
    src = _copy(golden_dir, tmp_path)
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(src)


def test_unknown_model_type(golden_dir, tmp_path):
    src = _copy(golden_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: .*'llada'"):
        load_model(src)


def test_no_weight_files(golden_dir, tmp_path):
    src = _copy(golden_dir, tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(src)


def test_missing_and_unexpected_tensors_are_named(golden_dir, tmp_path):
    src = _copy(golden_dir, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors.pop("model.transformer.blocks.2.q_proj.weight")
    tensors["model.transformer.extra.weight"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(src)
    assert "model.transformer.blocks.2.q_proj.weight" in str(err.value)
    assert "model.transformer.extra.weight" in str(err.value)


def test_shape_mismatch_names_tensor_and_shapes(golden_dir, tmp_path):
    src = _copy(golden_dir, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.transformer.blocks.0.k_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.k_proj\.weight has shape \(64, 128\), expected \(128, 128\)"):
        load_model(src)


def test_bad_dtype(golden_dir):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_model(golden_dir / "llada", dtype="int8")


def test_prompt_longer_than_max_sequence_length(golden_dir, tmp_path):
    from dare_pipeline import Pipeline

    src = _copy(golden_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_sequence_length"] = 40
    (src / "config.json").write_text(json.dumps(cfg))
    pipe = Pipeline(load_model(src), {"generation": {"gen_length": 32, "block_length": 32, "steps": 32}})
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length 40"):
        pipe.generate([list(range(10))])


def test_generation_config_end_of_answer_ids_stop_answers_too(golden_dir, tmp_path):
    """generation_config.json's eos_token_id (an id or a list, as Hugging Face writes it) ends answers
    besides config.json's; a value that is not a token id is refused naming the file."""
    src = _copy(golden_dir, tmp_path)
    eos = json.loads((src / "config.json").read_text())["eos_token_id"]
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 7, 11]}))
    assert load_model(src).config.stop_token_ids == (eos, 7, 11)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert load_model(src).config.stop_token_ids == (eos, 9)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, "x"]}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: eos_token_id = \[7, 'x'\]: expected a token "
                                              r"id \(or a list of them\) below the embedding size"):
        load_model(src)


def test_the_tokenizers_own_eos_token_ends_answers(tmp_path):
    """An instruct tokenizer whose eos token is not config.json's (Qwen-style `<|im_end|>`): answers
    end there too, as the references cut them at the tokenizer's eos."""
    from types import SimpleNamespace

    from dare_pipeline.models.loader import _end_of_answer_ids

    class Tokenizer:
        eos_token_id = 42

        @staticmethod
        def get_vocab():
            return {"<|eot|>": 40, "a": 1}

    cfg = SimpleNamespace(embedding_size=64, eos_token_id=3)
    assert _end_of_answer_ids(Tokenizer(), {}, cfg, tmp_path) == (40, 42)
    assert _end_of_answer_ids(None, {"eos_token_id": 5}, cfg, tmp_path) == (5,)
