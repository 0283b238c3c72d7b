"""The option validators of `dare_pipeline.config`: a third-party plugin's option errors read
like a built-in's (file, key path, value, what is allowed), as docs/plugins.md shows them."""

from __future__ import annotations

import attrs
import pytest

from dare_pipeline import Recipe
from dare_pipeline.config import (
    ConfigError,
    at_least,
    choice,
    in_range,
    layer_indices,
)
from dare_pipeline.core import Plugin
from dare_pipeline.core.registry import registered


@attrs.frozen(kw_only=True)
class MyReuseOptions:  # the class of docs/plugins.md, "Validating options"
    threshold: float = attrs.field(default=0.05, validator=at_least(0.0))
    row_budget: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1.0)))
    mode: str = attrs.field(default="fast", validator=choice("fast", "exact"))
    exempt_layers: tuple[int, ...] = attrs.field(default=(0,), validator=layer_indices)


class MyReuse(Plugin):
    name = "my_reuse"
    Options = MyReuseOptions


@pytest.mark.parametrize("entry, message", [
    ("threshold: -1", "plugins[0]: threshold = -1.0: must be >= 0.0"),
    ("row_budget: 2", "plugins[0]: row_budget = 2.0: must be between 0.0 and 1.0"),
    ("mode: x", "plugins[0]: mode = 'x': allowed values: ['fast', 'exact']"),
    ("exempt_layers: [-1]", "plugins[0]: exempt_layers = [-1]: layer indices must be >= 0"),
    ("threshold: high", "plugins[0].threshold = 'high': expected float, got str"),
    ("thresold: 0.1", ("plugins[0].thresold: unknown key; allowed keys: ['exempt_layers', 'mode', 'row_budget', "
                       "'threshold']")),
])
def test_a_third_party_option_error_names_the_file_key_value_and_what_is_allowed(tmp_path, entry, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"plugins:\n  - {{name: my_reuse, {entry}}}\n")
    with registered(MyReuse), pytest.raises(ConfigError) as error:
        Recipe.from_yaml(path)
    assert str(error.value) == f"{path}: {message}"


def test_good_options_load():
    with registered(MyReuse):
        recipe = Recipe.from_dict({"plugins": [{"name": "my_reuse", "threshold": 0.1, "row_budget": None,
                                                "mode": "exact", "exempt_layers": [0, 2]}]})
    assert recipe.plugins[0].name == "my_reuse"
