"""Generation values that would be accepted and then ignored or turned into nonsense are refused
with the key, the value and what is allowed: an empty stop string (it matched nowhere and was
skipped), a timestep_eps of 1 or more (Dream's timesteps run from 1 down to eps), a temperature the
float64 Gumbel-max sampler cannot represent."""

from __future__ import annotations

import pytest

from dare_pipeline import Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.config.recipe import MAX_TEMPERATURE


@pytest.mark.parametrize("generation, message", [
    ({"stop": [""]}, "stop = ['']: an empty string is not allowed"),
    ({"stop": ["####", ""]}, "stop = ['####', '']: an empty string is not allowed"),
    ({"timestep_eps": 2.0}, "timestep_eps = 2.0: must be between 0.0 and 1.0, 1.0 excluded"),
    ({"timestep_eps": 1.0}, "timestep_eps = 1.0: must be between 0.0 and 1.0, 1.0 excluded"),
    ({"timestep_eps": 0.0}, "timestep_eps = 0.0: must be > 0.0"),
    ({"temperature": 1e308}, f"temperature = 1e+308: must be between 0.0 and {MAX_TEMPERATURE}"),
    ({"temperature": 50}, f"temperature = 50.0: must be between 0.0 and {MAX_TEMPERATURE}"),
    ({"top_p": 1.5}, "top_p = 1.5: must be between 0.0 and 1.0"),
    ({"top_p": -0.1}, "top_p = -0.1: must be between 0.0 and 1.0"),
    ({"top_k": -1}, "top_k = -1: must be >= 0"),
])
def test_values_the_decoder_cannot_honour_are_refused(generation, message):
    with pytest.raises(ConfigError) as caught:
        Recipe.from_dict({"generation": generation}, source="r.yaml")
    assert str(caught.value) == f"r.yaml: generation: {message}" + (
        " (it would match at every position); give non-empty strings or leave the key out" if "stop" in generation
        else "")


@pytest.mark.parametrize("generation", [{"stop": ["\n\n"]}, {"timestep_eps": 0.5}, {"temperature": MAX_TEMPERATURE}])
def test_values_within_the_limits_load(generation):
    recipe = Recipe.from_dict({"generation": generation})
    assert all(getattr(recipe.generation, k) == (tuple(v) if isinstance(v, list) else v) for k, v in generation.items())
