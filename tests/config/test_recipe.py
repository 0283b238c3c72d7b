"""Recipe loading: every error names the file, the key path, the value and what is allowed."""

import re
from typing import ClassVar

import attrs
import pytest

from dare_pipeline import Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.config.recipe import baseline_recipe
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.core.registry import available_plugins, registered

DllmCache = available_plugins()["dllm_cache"]


@attrs.frozen
class SpeedOptions:
    threshold: float = attrs.field(default=0.5)
    layers: tuple[int, ...] = ()


class PolicyA(Plugin):
    name = "policy_a"
    provides = frozenset({"commit_policy"})
    Options = SpeedOptions

    @hookimpl
    def dare_select_commits(self, state, proposal):
        return proposal.candidates


class PolicyB(PolicyA):
    name = "policy_b"


class Feeder(Plugin):
    name = "feeder"
    provides = frozenset({"row_feed"})
    conflicts: ClassVar[dict[str, str]] = {"policy_b": "they disagree about everything"}


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_baseline_recipe_loads_and_is_the_default_recipe():
    recipe = Recipe.from_yaml("recipes/baseline.yaml")
    assert recipe.name == "baseline" and recipe.plugins == () and recipe == baseline_recipe()
    # the answer length is the model's: unset here
    assert (recipe.generation.gen_length, recipe.generation.block_length, recipe.generation.steps) == (None,) * 3


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: modle: unknown key; allowed keys: \[.*'model'"):
        Recipe.from_yaml(_write(tmp_path, "name: x\nmodle: default\n"))


def test_the_loaders_own_fields_are_not_keys_of_a_file(tmp_path):
    """`source` and `overridden` are set by the loader: in a file they are unknown keys, not dropped."""
    with pytest.raises(ConfigError, match=r"r\.yaml: source: unknown key; allowed keys: \[(?!.*'overridden')(?!.*'source')"):
        Recipe.from_yaml(_write(tmp_path, "source: elsewhere.yaml\n"))
    with pytest.raises(ConfigError, match=r"r\.yaml: overridden: unknown key"):
        Recipe.from_yaml(_write(tmp_path, "overridden: [gen_length]\n"))


def test_unknown_generation_key(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: generation\.gen_len: unknown key; allowed keys: .*'gen_length'"):
        Recipe.from_yaml(_write(tmp_path, "generation: {gen_len: 64}\n"))


def test_wrong_type_names_path_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"generation\.steps = 'many': expected int, got str"):
        Recipe.from_yaml(_write(tmp_path, "generation: {steps: many}\n"))


def test_bad_choice_lists_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"remasking = 'lowest': allowed values: \['low_confidence', 'random'\]"):
        Recipe.from_yaml(_write(tmp_path, "generation: {remasking: lowest}\n"))


def test_gen_length_not_multiple_of_block(tmp_path):
    with pytest.raises(ConfigError, match=r"generation: gen_length \(100\) must be a multiple of block_length \(32\)"):
        Recipe.from_yaml(_write(tmp_path, "generation: {gen_length: 100, block_length: 32, steps: 100}\n"))


def test_steps_not_multiple_of_blocks(tmp_path):
    with pytest.raises(ConfigError, match=r"steps \(102\) must be a multiple of the number of blocks"):
        Recipe.from_yaml(_write(tmp_path, "generation: {gen_length: 128, block_length: 32, steps: 102}\n"))


def test_unknown_plugin_lists_available(tmp_path):
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.name = 'turbo': unknown plugin; available: \[.*'baseline'"):
        Recipe.from_yaml(_write(tmp_path, "plugins: [{name: turbo}]\n"))


def test_unknown_plugin_option_and_bad_value(tmp_path):
    with registered(PolicyA):
        with pytest.raises(ConfigError, match=r"plugins\[0\]\.treshold: unknown key; allowed keys: \['layers', 'threshold'\]"):
            Recipe.from_yaml(_write(tmp_path, "plugins: [{name: policy_a, treshold: 0.1}]\n"))
        with pytest.raises(ConfigError, match=r"plugins\[0\]\.threshold = 'hi': expected float"):
            Recipe.from_yaml(_write(tmp_path, "plugins: [{name: policy_a, threshold: hi}]\n"))
        recipe = Recipe.from_yaml(_write(tmp_path, "plugins: [{name: policy_a, threshold: 1, layers: [0, 2]}]\n"))
        assert recipe.plugins[0].options == SpeedOptions(threshold=1.0, layers=(0, 2))


def test_two_owners_of_one_decision_are_named(tmp_path):
    with (registered(PolicyA, PolicyB),
          pytest.raises(ConfigError, match=r"'policy_a' and 'policy_b' both decide 'commit_policy'")):
        Recipe.from_yaml(_write(tmp_path, "plugins: [policy_a, policy_b]\n"))


def test_declared_conflict_says_why(tmp_path):
    with (registered(PolicyB, Feeder),
          pytest.raises(ConfigError, match="'feeder' cannot be combined with 'policy_b': they disagree")):
        Recipe.from_yaml(_write(tmp_path, "plugins: [policy_b, feeder]\n"))


def test_plugin_listed_twice(tmp_path):
    with registered(PolicyA), pytest.raises(ConfigError, match="plugin listed twice"):
        Recipe.from_yaml(_write(tmp_path, "plugins: [policy_a, policy_a]\n"))


def test_set_overrides_by_dotted_path_and_plugin_name():
    with registered(PolicyA):
        recipe = Recipe.from_dict({"plugins": [{"name": "policy_a"}]},
                                  overrides=["generation.gen_length=64", "generation.steps=64",
                                             "plugins.policy_a.threshold=0.25", "name=tuned"])
    assert recipe.generation.gen_length == 64 and recipe.plugins[0].options.threshold == 0.25
    assert recipe.name == "tuned"
    with pytest.raises(ConfigError, match=r"the recipe has no plugin 'nope'"):
        Recipe.from_dict({}, overrides=["plugins.nope.threshold=1"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        Recipe.from_dict({}, overrides=["generation.steps"])


def test_set_reaches_a_plugin_named_alone(tmp_path):
    """`plugins: [policy_a]` names the plugin without options: --set gives it one."""
    with registered(PolicyA):
        recipe = Recipe.from_yaml(_write(tmp_path, "plugins: [policy_a]\n"),
                                  overrides=["plugins.policy_a.threshold=0.25"])
    assert recipe.plugins[0].options.threshold == 0.25


def test_round_trip_through_dict():
    with registered(PolicyA):
        recipe = Recipe.from_dict({"name": "r", "generation": {"stop": ["\n\n"]},
                                   "plugins": [{"name": "policy_a", "threshold": 0.3}]})
        again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.from_yaml(_write(tmp_path, "generation: [unclosed\n"))


BAD_EVERYWHERE = """\
name: bad
modle: default
dtype: float8
generation: {gen_length: 0, colour: red, stop: [1, "x", 2]}
execution: {mode: fast}
plugins:
  - name: turbo
  - {name: policy_a, threshold: hi, layers: [0, a]}
"""


def test_every_mistake_of_a_file_is_reported_at_once(tmp_path):
    path = _write(tmp_path, BAD_EVERYWHERE)
    with registered(PolicyA), pytest.raises(ConfigError) as caught:
        Recipe.from_yaml(path, overrides=["generation.steps=many"])
    expected = [
        r"modle: unknown key; allowed keys: \[.*'model'",
        r"top level: dtype = 'float8': allowed values: \['float32', 'bfloat16', 'float16'\]",
        r"generation\.colour: unknown key; allowed keys: \[.*'gen_length'",
        r"generation\.stop\[0\] = 1: expected str, got int",
        r"generation\.stop\[2\] = 2: expected str, got int",
        r"generation\.steps = 'many': expected int, got str",
        r"generation: gen_length = 0: must be >= 1",
        r"execution: mode = 'fast': allowed values: \['auto'",
        r"plugins\[0\]\.name = 'turbo': unknown plugin; available: \[",
        r"plugins\[1\]\.threshold = 'hi': expected float, got str",
        r"plugins\[1\]\.layers\[1\] = 'a': expected int, got str",
    ]
    errors = caught.value.errors
    assert len(errors) == len(expected), errors
    for pattern in expected:
        assert sum(bool(re.match(rf"{re.escape(str(path))}: {pattern}", e)) for e in errors) == 1, pattern
    assert str(caught.value).splitlines() == errors


MISTAKES_AND_CONFLICTS = """\
generation: {gen_length: 0}
plugins:
  - {name: threshold_decoding, threshold: 2}
  - factor_decoding
  - dllm_cache
  - dual_cache
  - dllm_cache
"""


def test_conflicts_and_two_policies_come_with_the_other_mistakes(tmp_path):
    # a bad value, a bad plugin option, two commit policies, a declared conflict (declared by both
    # plugins: reported once) and a plugin listed twice: one run reports them all
    path = _write(tmp_path, MISTAKES_AND_CONFLICTS)
    with pytest.raises(ConfigError) as caught:
        Recipe.from_yaml(path)
    assert [e.removeprefix(f"{path}: ") for e in caught.value.errors] == [
        "generation: gen_length = 0: must be >= 1",
        "plugins[0]: threshold = 2.0: must be between 0.0 and 1.0",
        "plugins: 'threshold_decoding' and 'factor_decoding' both decide 'commit_policy'; keep one of them",
        "plugins: 'dllm_cache' cannot be combined with 'dual_cache': " + DllmCache.conflicts["dual_cache"],
        "plugins[4].name = 'dllm_cache': plugin listed twice",
    ]


def test_one_mistake_keeps_its_single_message(tmp_path):
    with pytest.raises(ConfigError) as caught:
        Recipe.from_yaml(_write(tmp_path, "generation: {steps: many}\n"))
    assert caught.value.errors == [str(caught.value)] and "\n" not in str(caught.value)


def test_checks_across_fields_wait_for_valid_fields(tmp_path):
    # gen_length 100 is no multiple of 32, but the bad temperature is what the file must fix first
    with pytest.raises(ConfigError) as caught:
        Recipe.from_yaml(_write(tmp_path, "generation: {gen_length: 100, temperature: -1}\n"))
    assert caught.value.errors == [f"{tmp_path / 'r.yaml'}: generation: temperature = -1.0: must be >= 0.0"]


@attrs.frozen
class PairOptions:
    low: int = attrs.field(default=0)
    high: int = attrs.field(default=10)
    width: int = attrs.field(default=1)

    @high.validator
    def _above_low(self, attribute, value):
        if value < self.low:
            raise ValueError(f"high = {value}: must be >= low ({self.low})")

    @width.validator
    def _positive(self, attribute, value):
        if value < 1:
            raise ValueError(f"width = {value}: must be >= 1")


class PairPlugin(Plugin):
    name = "pair"
    Options = PairOptions


def test_validators_that_read_other_fields_see_the_given_values(tmp_path):
    with registered(PairPlugin):
        with pytest.raises(ConfigError) as caught:
            Recipe.from_yaml(_write(tmp_path, "plugins: [{name: pair, low: 5, high: 3, width: 0}]\n"))
        assert [e.split(": ", 2)[2] for e in caught.value.errors] == ["high = 3: must be >= low (5)",
                                                                       "width = 0: must be >= 1"]
        with pytest.raises(ConfigError) as caught:  # low left at its default
            Recipe.from_yaml(_write(tmp_path, "plugins: [{name: pair, high: -1, width: 0}]\n"))
        assert [e.split(": ", 2)[2] for e in caught.value.errors] == ["high = -1: must be >= low (0)",
                                                                       "width = 0: must be >= 1"]
        assert Recipe.from_dict({"plugins": [{"name": "pair", "low": 5, "high": 6}]}).plugins[0].options.high == 6
