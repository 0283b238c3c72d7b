"""Bad recipes, --set values and command-line flags: one clear line naming the file, the key, the value
and what is allowed (exit 2 on the command line), never a traceback, never silent acceptance."""

from __future__ import annotations

import math
import subprocess
import sys

import attrs
import pytest
import yaml

from dare_pipeline import Recipe
from dare_pipeline.cli import main
from dare_pipeline.config import ConfigError, at_least, in_range

BASELINE = "recipes/baseline.yaml"


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dare-pipeline: error: ") and err.count("\n") == 1, err
    return err


def _argparse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---- NaN and infinities ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["temperature", "cfg_scale", "timestep_eps"])
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_non_finite_generation_floats_are_refused(tmp_path, key, text):
    path = tmp_path / "r.yaml"
    path.write_text(f"generation: {{{key}: {text}}}\n")
    with pytest.raises(ConfigError, match=rf"r\.yaml: generation\.{key} = -?(nan|inf): expected a finite number"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize("plugin, option", [("dare_kv", "threshold"), ("dare_o", "threshold"),
                                            ("dllm_cache", "ratio"), ("threshold_decoding", "threshold"),
                                            ("factor_decoding", "factor"), ("dare_kv", "row_budget")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_plugin_options_are_refused(plugin, option, value):
    with pytest.raises(ConfigError, match=rf"plugins\[0\]\.{option} = -?(nan|inf): expected a finite number"):
        Recipe.from_dict({"plugins": [{"name": plugin, option: value}]})


def test_an_integer_too_large_for_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("generation: {temperature: 1" + "0" * 400 + "}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: generation\.temperature = 100000000000\.\.\. \(401 digits\): "
                                          r"expected a finite number"):
        Recipe.from_yaml(path)
    with pytest.raises(ConfigError, match=r"steps \(10+1\) must be a multiple"):  # ints stay exact
        Recipe.from_dict({"generation": {"gen_length": 256, "block_length": 32, "steps": 10**400 + 1}})


def test_nan_through_set_names_the_flag_value(capsys):
    err = _cli_error(["recipe", "check", BASELINE, "--set", "generation.temperature=.nan"], capsys)
    assert "generation.temperature = nan: expected a finite number" in err


@pytest.mark.parametrize("validator", [at_least(0.0), at_least(0.0, strict=True), in_range(0.0, 1.0)])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "0.5"])
def test_shared_validators_refuse_non_finite_values(validator, value):
    """Options built without a recipe (attrs validators alone: a third-party plugin's options, the
    Python API) are refused the same way."""

    @attrs.frozen
    class Options:
        threshold: float = attrs.field(validator=validator)

    with pytest.raises(ValueError, match=r"threshold = .*: expected a finite number"):
        Options(threshold=value)
    assert Options(threshold=0.5).threshold == 0.5


# ---- recipes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [("plugins: dllm_cache", "'dllm_cache'"),
                                         ("plugins: {name: dllm_cache}", "{'name': 'dllm_cache'}"),
                                         ("plugins: 3", "3")])
def test_plugins_given_as_a_scalar_or_a_mapping(tmp_path, text, shown):
    path = tmp_path / "r.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=rf"r\.yaml: plugins = {shown}: expected a list"):
        Recipe.from_yaml(path)


def test_timestep_eps_in_exponent_form_is_a_number(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("generation: {timestep_eps: 1e-3, schedule: timesteps, temperature: 5E-1}\n")
    assert isinstance(yaml.safe_load(path.read_text())["generation"]["timestep_eps"], str)  # YAML 1.1
    generation = Recipe.from_yaml(path).generation
    assert generation.timestep_eps == 0.001 and generation.temperature == 0.5
    assert Recipe.from_yaml(BASELINE, overrides=["generation.timestep_eps=2e-3"]).generation.timestep_eps == 0.002


@pytest.mark.parametrize("text", ["abc", "1e", "e-3", "1e-3x", ".nan"])
def test_strings_that_are_not_numbers_stay_errors(text):
    with pytest.raises(ConfigError, match="generation.timestep_eps = .*expected (float|a finite number)"):
        Recipe.from_dict({"generation": {"timestep_eps": text}})


def test_non_utf8_recipe_names_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        Recipe.from_yaml(path)
    assert "latin1.yaml: not UTF-8 text" in _cli_error(["recipe", "check", str(path)], capsys)


def test_steps_greater_than_gen_length_is_said(capsys):
    """Valid (Dream's timestep schedule may plan more steps than tokens), but some forwards commit
    nothing: `recipe check` and `generate` say so on stderr."""
    recipe = Recipe.from_dict({"generation": {"gen_length": 32, "block_length": 16, "steps": 64}})
    assert recipe.generation.steps == 64
    argv = ["--set", "generation.gen_length=32", "--set", "generation.steps=64"]
    note = "note: recipes/baseline.yaml: generation.steps = 64 exceeds gen_length = 32: with a fixed-step schedule"
    assert main(["recipe", "check", BASELINE, *argv]) == 0
    assert note in capsys.readouterr().err
    assert main(["generate", "--recipe", BASELINE, "--prompt-ids", "5,6", *argv]) == 0
    assert note in capsys.readouterr().err
    assert main(["recipe", "check", BASELINE, "--set", "generation.steps=64"]) == 0  # the model's 64 tokens
    assert "note:" not in capsys.readouterr().err
    assert main(["recipe", "check", BASELINE, "--set", "generation.steps=128"]) == 0
    assert "generation.steps = 128 exceeds gen_length = 64" in capsys.readouterr().err


# ---- --set -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["[1", "{a: 1", "'open", "a: b: c", "*alias"])
def test_set_value_that_is_not_yaml(capsys, value):
    err = _cli_error(["recipe", "check", BASELINE, "--set", f"generation.stop={value}"], capsys)
    assert f"--set generation.stop={value}: the value is not valid YAML" in err


def test_set_plugin_option_on_a_recipe_without_that_plugin(capsys, tmp_path):
    err = _cli_error(["recipe", "check", BASELINE, "--set", "plugins.dllm_cache.ratio=0.5"], capsys)
    assert "--set plugins.dllm_cache.ratio: the recipe has no plugin 'dllm_cache'; its plugins: []" in err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("plugins: dllm_cache\n")
    err = _cli_error(["recipe", "check", str(scalar), "--set", "plugins.dllm_cache.ratio=0.5"], capsys)
    assert "scalar.yaml: plugins = 'dllm_cache': expected a list of plugins" in err


# ---- command-line flags ------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["generate", "--recipe", BASELINE, "--prompt-ids", "1"],
                                     ["eval", "--tasks", "dare_add"], ["ablate", "a.yaml"],
                                     ["calibrate", "--recipe", BASELINE, "--prompts", "p", "--target-reuse", "0.5"]])
@pytest.mark.parametrize("threads", ["-1", "0", "two"])
def test_threads_must_be_a_positive_integer(capsys, command, threads):
    err = _argparse_error([*command, "--threads", threads], capsys)
    assert "argument --threads:" in err and "expected an integer >= 1" in err


@pytest.mark.parametrize("ids, bad", [("1,x", "'x'"), ("1,,2", "''"), ("-3", "'-3'"), ("1.5", "'1.5'"), ("", "''"),
                                      ("0x10", "'0x10'")])
def test_malformed_prompt_ids_name_the_flag(capsys, ids, bad):
    err = _argparse_error(["generate", "--recipe", BASELINE, f"--prompt-ids={ids}"], capsys)
    assert f"argument --prompt-ids: {ids!r}: {bad} is not a token id" in err


def test_prompt_ids_allow_spaces_and_a_trailing_comma():
    from dare_pipeline.cli.args import token_ids

    assert token_ids(" 1, 2,3,") == [1, 2, 3]


def test_non_utf8_prompt_text_from_the_command_line(golden_dir):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates: a one-line error, exit 2."""
    result = subprocess.run([sys.executable, "-m", "dare_pipeline.cli", "generate", b"caf\xff", "--recipe", BASELINE,
                             "--set", "generation.gen_length=32", "--set", "generation.steps=32"],
                            check=False, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode("utf-8", "replace")
    assert err.startswith("dare-pipeline: error: prompt 0: not valid UTF-8 text") and err.count("\n") == 1
