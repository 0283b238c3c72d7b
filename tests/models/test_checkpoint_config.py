"""config.json values: every bad one (NaN, negative, zero, a bool or a string where a size belongs,
10^7 layers, a width no machine holds) is a CheckpointError naming the checkpoint, the key and the
value, before anything is built; a bounded fuzz over the values of both families."""

from __future__ import annotations

import json
import math
import resource
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dare_pipeline import load_model
from dare_pipeline.models import CheckpointError
from dare_pipeline.models.config_reader import MAX_LAYERS, shown


@pytest.fixture
def llada(golden_dir, tmp_path):
    dst = tmp_path / "llada"
    shutil.copytree(golden_dir / "llada", dst)
    return dst


def _write_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))  # NaN and Infinity are written as Python's reader accepts them
    return path


@pytest.mark.parametrize("key, value, problem", [
    ("n_layers", 10**7, f"expected an integer from 1 to {MAX_LAYERS}"),
    ("n_layers", -1, "expected an integer from 1 to"), ("n_layers", 0, "expected an integer from 1 to"),
    ("n_layers", 4.0, "expected an integer"), ("n_layers", True, "expected an integer"),
    ("d_model", -128, "expected an integer >= 1"), ("d_model", "128", "expected an integer"),
    ("n_heads", 0, "expected an integer >= 1"), ("mlp_hidden_size", -5, "expected an integer >= 1"),
    ("rope_theta", math.nan, "expected a finite number > 0"), ("rope_theta", -1.0, "expected a finite number > 0"),
    ("rope_theta", math.inf, "expected a finite number > 0"), ("rms_norm_eps", math.nan, "expected a finite number"),
    ("rms_norm_eps", 0, "expected a finite number > 0 and < 1"), ("rms_norm_eps", 2.0, "expected a finite number > 0 and < 1"),
    ("max_sequence_length", -4096, "expected an integer from 1 to"),
    ("max_sequence_length", 10**12, "expected an integer from 1 to 16777216"),
    ("weight_tying", "false", "expected true or false"), ("include_qkv_bias", 1, "expected true or false"),
    ("vocab_size", math.nan, "expected an integer"),
])
def test_a_bad_value_names_the_checkpoint_the_key_and_the_value(llada, key, value, problem):
    path = _write_config(llada, **{key: value})
    with pytest.raises(CheckpointError) as caught:
        load_model(llada)
    assert str(caught.value).startswith(f"{path}: {key} = {shown(value)}: {problem}")


@pytest.mark.parametrize("family, key, value, supported", [
    ("llada", "activation_type", "gelu", "'silu' or null / absent"),
    ("llada", "layer_norm_type", "default", "'rms' or null / absent"),
    ("llada", "scale_logits", True, "False or null / absent"),
    ("llada", "clip_qkv", 8.0, "null / absent"),
    ("llada", "input_emb_norm", True, "False or null / absent"),
    ("llada", "attention_layer_norm", True, "False or null / absent"),
    ("llada", "multi_query_attention", True, "False or null / absent"),
    ("dream", "hidden_act", "gelu_pytorch_tanh", "'silu' or null / absent"),
    ("dream", "rope_scaling", {"type": "yarn", "factor": 4.0}, "null / absent"),
    ("dream", "use_sliding_window", True, "False or null / absent"),
])
def test_a_setting_that_changes_the_outputs_and_is_not_implemented_is_refused(golden_dir, tmp_path, family, key,
                                                                              value, supported):
    """A checkpoint that needs another activation, norm, logit scaling, RoPE scaling or attention
    window would load and compute other logits in silence: refused, naming the key and value."""
    directory = tmp_path / family
    shutil.copytree(golden_dir / family, directory)
    path = _write_config(directory, **{key: value})
    with pytest.raises(CheckpointError) as caught:
        load_model(directory)
    assert str(caught.value) == (f"{path}: {key} = {shown(value)}: not supported (model_type "
                                 f"{'llada' if family == 'llada' else 'Dream'!r}); supported: {supported}")


@pytest.mark.parametrize("changes, message", [
    ({"n_heads": 5}, "d_model = 128 is not divisible by n_heads = 5"),
    ({"n_heads": 128, "n_kv_heads": 128}, "d_model = 128 / n_heads = 128 = 1: rotary embeddings need an even head"),
    ({"n_kv_heads": 3}, "n_heads = 4 is not a multiple of n_kv_heads = 3"),
    ({"embedding_size": 100}, "embedding_size = 100 is smaller than vocab_size = 512"),
])
def test_values_that_do_not_fit_together_are_named(llada, changes, message):
    _write_config(llada, **changes)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load_model(llada)


def test_a_config_no_machine_holds_is_refused_from_its_estimate(llada):
    path = _write_config(llada, d_model=1 << 20, n_heads=1 << 10, n_kv_heads=1 << 10, mlp_hidden_size=1 << 22)
    with pytest.raises(CheckpointError) as caught:
        load_model(llada)
    message = str(caught.value)
    assert message.startswith(f"{path}: the weights need about ") and " in float32 (" in message
    assert "parameters from d_model = 1048576, n_layers = 4, n_heads = 1024, n_kv_heads = 1024, mlp_hidden_size = " \
           "4194304, vocab_size = 512, embedding_size = 512, include_qkv_bias = false, weight_tying = false) but " \
           "cpu has " in message and message.endswith(" available")


def test_a_shape_that_config_json_does_not_explain_names_its_values(llada):
    _write_config(llada, mlp_hidden_size=256)
    with pytest.raises(CheckpointError, match=r"ff_out\.weight has shape \(128, 384\), expected \(128, 256\) \(config"
                                              r"\.json: d_model = 128, n_layers = 4, .*mlp_hidden_size = 256,"):
        load_model(llada)
    _write_config(llada, mlp_hidden_size=384, n_layers=5)
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model\.transformer\.blocks\.4\..*\(config\.json: "
                                              r"d_model = 128, n_layers = 5,"):
        load_model(llada)


def test_an_integer_too_long_for_python_to_read_is_a_checkpoint_error(llada):
    path = llada / "config.json"
    path.write_text(path.read_text().replace('"n_layers": 4', '"n_layers": 1' + "0" * 5000))
    with pytest.raises(CheckpointError, match=r"config\.json: cannot be read as JSON \(Exceeds the limit"):
        load_model(llada)


# ---- a bounded fuzz over the values of both families' config.json ---------------------------------

KEYS = {
    "llada": ["d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "mlp_ratio", "vocab_size",
              "embedding_size", "rope_theta", "rms_norm_eps", "max_sequence_length", "include_qkv_bias",
              "weight_tying", "mask_token_id", "eos_token_id", "pad_token_id", "eot_token_ids", "block_type", "rope"],
    "dream": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
              "mask_token_id", "bos_token_id", "eos_token_id"],
}
VALUES = st.one_of(
    st.integers(-3, 3), st.integers(-10**6, 10**6), st.sampled_from([10**7, 10**12, 10**30, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 2.0, 4.0, 1e-12, 1e308]),
    st.booleans(), st.none(), st.text(max_size=20), st.lists(st.integers(-5, 600), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(family=st.sampled_from(sorted(KEYS)), data=st.data())
def test_fuzz_config_values_give_a_checkpoint_error_or_a_model(golden_dir, tmp_path_factory, family, data):
    directory = tmp_path_factory.mktemp("fuzz") / family
    shutil.copytree(golden_dir / family, directory)
    changes = data.draw(st.dictionaries(st.sampled_from(KEYS[family]), VALUES, min_size=1, max_size=3))
    path = _write_config(directory, **changes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_model(directory)
    except CheckpointError as error:
        message = str(error)
        assert message.startswith(str(directory)), message
        assert any(f"{key} = " in message or f"'{key}'" in message or f"{key} has" in message
                   for key in changes), (changes, message)
        given = [v for v in changes.values() if v is not None]  # null: the key's default, named with it
        if given and "missing required key" not in message:
            assert any(shown(v) in message or str(v).lower() in message for v in given), (changes, message)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 1 << 30, f"{changes}: loading grew the process by {grown} bytes"
    shutil.rmtree(directory)
    del path
