"""Keyword overrides of a recipe's generation settings (`Pipeline.generate(..., steps=64)`), checked
exactly as the recipe's `generation:` keys are; `max_new_tokens` (the Hugging Face name) means
`gen_length`."""

from __future__ import annotations

import attrs

from .loading import ConfigError, structure

ALIASES = {"max_new_tokens": "gen_length"}


def generation_with_overrides(generation, overrides: dict, source: str):
    """`generation` (a GenerationConfig) with `overrides` applied and validated; errors name the keyword."""
    data = attrs.asdict(generation)
    data["stop"] = list(generation.stop)
    for alias, ours in ALIASES.items():
        if alias in overrides and ours in overrides:
            raise ConfigError(f"{source}: generate() keyword arguments: {alias} and {ours} both given; {alias} "
                              f"means {ours}: give one")
    data.update({ALIASES.get(key, key): value for key, value in overrides.items()})
    return structure(type(generation), data, "generation", f"{source} (generate() keyword arguments)")
