"""Who chooses the answer canvas: `gen_length`, `block_length` and `steps`, resolved by precedence.

Highest first: the command line / `generate()` keywords, the recipe's own keys, the model's
`generation_config.json` (Hugging Face's file: `max_new_tokens`, and with it the diffusion keys
`steps` and `block_length`), then the library defaults (256 tokens in blocks of 32, clamped to
gen_length, one token per step). A recipe that leaves a key unset (None) lets the model choose.

Two keys depend on gen_length. When a level sets gen_length, a `steps` of a lower level no longer
holds: steps follows gen_length (one token per step) unless that level gives steps too. A lower
level's `block_length` longer than the new gen_length is cut to it. What still does not fit is an
error naming each value and the level it came from.
"""

from __future__ import annotations

from .loading import ConfigError

LENGTH_KEYS = ("gen_length", "block_length", "steps")
DEFAULT_GEN_LENGTH = 256
DEFAULT_BLOCK_LENGTH = 32
LIBRARY = "the library default"
# generation_config.json's name for each length key
MODEL_KEYS = {"max_new_tokens": "gen_length", "block_length": "block_length", "steps": "steps"}


def model_lengths(generation_config: dict | None, source: str) -> dict:
    """The length keys a checkpoint's generation_config.json (`generation_config`, read from
    `source`) chooses: none without `max_new_tokens` (Dream's reference files carry a `steps` of
    their own examples without a length), else max_new_tokens as gen_length, with steps and
    block_length when given. Values must be whole numbers >= 1."""
    if not generation_config or generation_config.get("max_new_tokens") is None:
        return {}
    out = {}
    for theirs, ours in MODEL_KEYS.items():
        value = generation_config.get(theirs)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: {theirs} = {value!r}: expected a whole number >= 1")
        out[ours] = value
    return out


def layer(values: dict, origins: dict, keys: dict, source: str) -> None:
    """Put one level's length keys (`keys`, None = unset) over the lower levels' `values` (in place;
    `origins` says where each value came from), with the rules of this module's docstring."""
    keys = {k: v for k, v in keys.items() if k in LENGTH_KEYS and v is not None}
    gen_length = keys.get("gen_length")
    if isinstance(gen_length, int):
        if "steps" not in keys:  # steps of a lower level were for another length
            values.pop("steps", None)
            origins.pop("steps", None)
        block = values.get("block_length")
        if "block_length" not in keys and isinstance(block, int) and block > gen_length:
            values["block_length"] = gen_length
            origins["block_length"] = f"{origins['block_length']}, cut to gen_length"
    values.update(keys)
    origins.update(dict.fromkeys(keys, source))


def resolve(levels: list[tuple[str, dict]], where: str) -> dict:
    """gen_length, block_length and steps from `levels` [(source, keys)], lowest first, then the
    library defaults; a ConfigError prefixed by `where` names each value and its source when
    gen_length is no multiple of block_length or steps no multiple of the number of blocks."""
    values, origins = {}, {}
    for source, keys in levels:
        layer(values, origins, keys, source)
    if "gen_length" not in values:
        values["gen_length"], origins["gen_length"] = DEFAULT_GEN_LENGTH, LIBRARY
    if "block_length" not in values:
        values["block_length"] = min(DEFAULT_BLOCK_LENGTH, values["gen_length"])
        origins["block_length"] = LIBRARY
    if "steps" not in values:
        values["steps"], origins["steps"] = values["gen_length"], "one token per step"
    shown = {k: f"{k} = {values[k]} ({origins[k]})" for k in LENGTH_KEYS}
    if values["gen_length"] % values["block_length"]:
        raise ConfigError(f"{where}: generation: {shown['gen_length']} is not a multiple of "
                          f"{shown['block_length']}: give a block_length that divides gen_length, or a gen_length "
                          f"that is a multiple of {values['block_length']}")
    blocks = values["gen_length"] // values["block_length"]
    if values["steps"] % blocks:
        raise ConfigError(f"{where}: generation: {shown['steps']} is not a multiple of the number of blocks "
                          f"(gen_length / block_length = {blocks}; {shown['gen_length']}, {shown['block_length']})")
    return values


MAX_TOKENS_HELP = ("the answer length (generation.gen_length; steps follow it, one token per step, unless --set "
                   "gives them; default: the recipe's, else the model's generation_config.json, else 256)")


def with_max_tokens(max_tokens: int | None, overrides: list[str]) -> list[str]:
    """The command line's --set items with --max-tokens N as `generation.gen_length=N` (steps follow
    it unless --set gives them); --max-tokens and a --set of gen_length together are an error."""
    if max_tokens is None:
        return list(overrides)
    clash = [item for item in overrides if item.split("=", 1)[0].strip() == "generation.gen_length"]
    if clash:
        raise ConfigError(f"--max-tokens {max_tokens} and --set {clash[0]} both set gen_length: give one")
    return [f"generation.gen_length={max_tokens}", *overrides]
