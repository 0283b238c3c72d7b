"""Configuration files and YAML values within bounds: alias bombs, deep nesting, duplicate keys, empty
files, files that are not regular files, and huge values in error messages."""

from __future__ import annotations

import os

import pytest

from dare_pipeline import Recipe
from dare_pipeline.cli import main
from dare_pipeline.config import ConfigError
from dare_pipeline.config.files import MAX_DEPTH, MAX_NODES, parse_yaml, read_text_file
from dare_pipeline.config.loading import shown

# nine levels of ten aliases each: 10^9 values once expanded, a few hundred bytes as text
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


def _write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_alias_bomb_in_a_recipe_is_refused_before_it_expands(tmp_path):
    path = _write(tmp_path, BOMB + "name: bomb\ngeneration: {stop: *i}\n")
    with pytest.raises(ConfigError, match=rf"r\.yaml: expands to more than {MAX_NODES} values \(anchors and aliases "
                                          rf"counted at every use\)"):
        Recipe.from_yaml(path)


def test_an_alias_bomb_in_a_set_value_gives_a_short_error():
    value = "{" + BOMB.strip().replace("\n", ", ") + "}"
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict({}, overrides=[f"generation.stop={value}"])
    message = str(caught.value)
    assert message.startswith("<dict>: --set generation.stop={a: &a [x, x, x, x, x, x, x, x, x, x], b: &b [*a, *a,")
    assert message.endswith(f"... ({len(value)} characters): expands to more than {MAX_NODES} values (anchors and "
                            f"aliases counted at every use); a configuration this large is refused")
    assert len(message) < 400


def test_anchors_and_aliases_within_the_bounds_are_read(tmp_path):
    path = _write(tmp_path, "generation: &g {gen_length: 64, steps: 64}\nplugins:\n"
                            "  - {name: threshold_decoding, threshold: &t 0.8}\n"
                            "name: &n shared\ndescription: *n\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.generation.gen_length == 64 and recipe.plugins[0].options.threshold == 0.8
    assert recipe.description == recipe.name == "shared"
    assert parse_yaml("base: &b {x: 1, y: 2}\nderived: {<<: *b, y: 3}\n", "m.yaml") == {
        "base": {"x": 1, "y": 2}, "derived": {"x": 1, "y": 3}}  # a merge key overrides without a duplicate


def test_an_alias_that_contains_itself_is_refused():
    with pytest.raises(ConfigError, match="an alias refers to a node that contains it"):
        parse_yaml("a: &a [1, *a]\n", "loop.yaml")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000, 100_000])
def test_deep_nesting_in_a_file_is_a_clear_error(tmp_path, depth):
    path = _write(tmp_path, "generation: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match=rf"r\.yaml: line 1: nested more than {MAX_DEPTH} levels deep"):
        Recipe.from_yaml(path)


def test_deep_nesting_from_python_is_a_clear_error():
    data: dict = {}
    inner = data
    for _ in range(10_000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(ConfigError, match=rf"<dict>: nested more than {MAX_DEPTH} levels deep"):
        Recipe.from_dict({"generation": data})
    looped: dict = {"name": "loop"}
    looped["generation"] = looped
    with pytest.raises(ConfigError, match="a mapping or list contains itself"):
        Recipe.from_dict(looped)


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = _write(tmp_path, "name: a\ngeneration:\n  steps: 64\n  gen_length: 64\n  steps: 128\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: line 5: key 'steps' given twice in one mapping \(first at line "
                                          r"3\); YAML would keep only the last"):
        Recipe.from_yaml(path)


def test_recipe_check_refuses_duplicate_keys_and_empty_files(tmp_path, capsys):
    duplicate = _write(tmp_path, "name: a\nname: b\n", "dup.yaml")
    empty = _write(tmp_path, "", "empty.yaml")
    comments = _write(tmp_path, "# nothing yet\n", "comments.yaml")
    assert main(["recipe", "check", str(duplicate), str(empty), str(comments)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"dare-pipeline: error: {duplicate}: line 2: key 'name' given twice in one mapping (first at line "
                   f"1); YAML would keep only the last",
                   f"dare-pipeline: error: {empty}: the file is empty; a recipe is a mapping of keys such as name, "
                   f"model, generation, plugins ({{}} takes every default)",
                   f"dare-pipeline: error: {comments}: the file is empty; a recipe is a mapping of keys such as name, "
                   f"model, generation, plugins ({{}} takes every default)"]
    assert Recipe.from_yaml(_write(tmp_path, "{}\n", "defaults.yaml")) == Recipe()


def test_a_path_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path):
    fifo = tmp_path / "recipe.fifo"
    os.mkfifo(fifo)  # opening it to read would block until a writer comes
    with pytest.raises(ConfigError, match=r"recipe\.fifo: is a FIFO \(named pipe\), not a regular file; expected a "
                                          r"recipe file"):
        Recipe.from_yaml(fifo)
    with pytest.raises(ConfigError, match=rf"{tmp_path}: is a directory, not a regular file; expected a recipe file"):
        Recipe.from_yaml(tmp_path)
    with pytest.raises(ConfigError, match="/dev/zero: is a character device, not a regular file"):
        Recipe.from_yaml("/dev/zero")
    with pytest.raises(ConfigError, match="missing.yaml: recipe file not found"):
        Recipe.from_yaml(tmp_path / "missing.yaml")


def test_a_file_too_large_for_a_configuration_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros
    with pytest.raises(ConfigError, match=r"huge\.yaml: 67108864 bytes; a recipe file may have at most 4194304 bytes"):
        read_text_file(path, "recipe file")


def test_huge_values_are_cut_short_in_error_messages():
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict({"generation": {"steps": "x" * 10_000_000}})
    message = str(caught.value)
    assert len(message) < 300 and "(10000000 characters): expected int, got str" in message
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict({"generation": {"stop": list(range(1_000_000))}})
    assert len(str(caught.value)) < 2000
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict({}, overrides=["generation.steps=" + "9" * 5000])
    assert "an integer of about 5000 digits" in str(caught.value) or "exceeds the limit" in str(caught.value).lower()
    assert len(str(caught.value)) < 400
    assert shown(list(range(100))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...] (100 items)"
    assert shown("ab") == "'ab'" and shown(1.5) == "1.5"


@pytest.mark.parametrize("value", [True, False])
def test_a_control_character_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"^src: .*special characters are not allowed"):
        parse_yaml("\xff\x13", "src", value=value)
    with pytest.raises(ConfigError, match=r"special characters are not allowed"):
        Recipe.from_dict({}, overrides=["plugins.threshold_decoding.shadow=\xff\x13"])
