"""Recipes: a model, generation settings and a stack of plugins, loaded from YAML and validated.

    name: baseline
    model: default          # a local checkpoint dir, or "default" for the embedded model
    generation: {temperature: 0.0, remasking: low_confidence, cfg_scale: 0.0}
    plugins: []             # list of {name: <plugin>, <option>: <value>, ...}

gen_length, block_length and steps left unset are chosen by the model (generation.py).
Every error names the file, the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import attrs

from ..core.registry import available_plugins
from .device import usable_device
from .execution import ExecutionConfig
from .files import check_nesting, parse_yaml, read_yaml_file
from .generation import LENGTH_KEYS, layer, model_lengths, resolve
from .loading import ConfigError, at_least, choice, convert, in_range, non_empty_strings, shown, structure

MAX_TEMPERATURE = 10.0


@attrs.frozen(kw_only=True)
class GenerationConfig:
    # None: chosen by the model's generation_config.json, else the library defaults (generation.py:
    # 256 tokens, blocks of 32, one token per step); a Pipeline decodes with every one set
    gen_length: int | None = attrs.field(default=None, validator=at_least(1))
    block_length: int | None = attrs.field(default=None, validator=at_least(1))
    # total steps over all blocks for fixed-step policies (steps per block = steps / blocks)
    steps: int | None = attrs.field(default=None, validator=at_least(1))
    # the Gumbel-max sampler divides by (-log u)^T in float64, exact only while that neither
    # underflows nor overflows (T up to about 19); at 10 the sampling is already far from the model's
    temperature: float = attrs.field(default=0.0, validator=[at_least(0.0), in_range(0.0, MAX_TEMPERATURE)])
    # nucleus and top-k filters on the tempered distribution (Dream's reference rules, core/sampling.py):
    # 1 and 0 are off
    top_p: float = attrs.field(default=1.0, validator=in_range(0.0, 1.0))
    top_k: int = attrs.field(default=0, validator=at_least(0))
    # low_confidence: commit the most confident proposals; random: a random order
    remasking: str = attrs.field(default="low_confidence", validator=choice("low_confidence", "random"))
    # what "confident" means: top-1 probability, top-1 minus top-2 margin, or negative entropy (Dream's options)
    confidence: str = attrs.field(default="probability", validator=choice("probability", "margin", "neg_entropy"))
    # commits per step for fixed-step policies: linear (LLaDA) or timesteps (Dream)
    schedule: str = attrs.field(default="linear", validator=choice("linear", "timesteps"))
    # Dream's timesteps run from 1 down to eps: eps in (0, 1)
    timestep_eps: float = attrs.field(default=1e-3, validator=[at_least(0.0, strict=True),
                                                                in_range(0.0, 1.0, include_high=False)])
    cfg_scale: float = attrs.field(default=0.0, validator=at_least(0.0))
    # text after any of these strings is cut from the answer
    stop: tuple[str, ...] = attrs.field(default=(), validator=non_empty_strings)
    seed: int = 0
    # guard against a model that keeps proposing the mask token (default 4 x max(steps/block, block))
    max_steps_per_block: int | None = attrs.field(default=None, validator=at_least(1))

    def __attrs_post_init__(self):  # what is set must fit; the rest is checked when it is resolved
        if self.gen_length is None or self.block_length is None:
            return
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of block_length "
                             f"({self.block_length})")
        blocks = self.gen_length // self.block_length
        if self.steps is not None and self.steps % blocks:
            raise ValueError(f"steps ({self.steps}) must be a multiple of the number of blocks "
                             f"(gen_length / block_length = {blocks})")


@attrs.frozen
class PluginSpec:
    name: str
    options: Any  # the plugin's validated Options instance


@attrs.frozen(kw_only=True)
class Recipe:
    name: str = "unnamed"
    description: str = ""
    model: str = "default"
    dtype: str = attrs.field(default="float32", validator=choice("float32", "bfloat16", "float16"))
    device: str = attrs.field(default="cpu", validator=usable_device)
    generation: GenerationConfig = attrs.Factory(GenerationConfig)
    execution: ExecutionConfig = attrs.Factory(ExecutionConfig)
    plugins: tuple[PluginSpec, ...] = ()
    # where the recipe came from, and the generation keys overrides (--set, --max-tokens) set, named
    # as such in resolution errors: the loader's, not keys of a file
    source: str = attrs.field(default="<dict>", eq=False, metadata={"internal": True})
    overridden: frozenset[str] = attrs.field(default=frozenset(), eq=False, repr=False, metadata={"internal": True})

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        return cls.from_dict(read_recipe_file(path), source=str(path), overrides=overrides)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Recipe:
        check_nesting(data, source)  # before copying: deepcopy recurses
        data = copy.deepcopy(data) if data is not None else {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level: expected a mapping, got {type(data).__name__}")
        errors = []  # every mistake of the file and the overrides, reported at once
        in_file = copy.deepcopy(data.get("generation"))
        for item in overrides or ():
            _collect(errors, apply_override, data, item, source)
        given = {item.split("=", 1)[0].strip() for item in overrides or ()}  # the keys the overrides set
        _overrides_over_file(data, in_file, given, source)
        raw_plugins = data.pop("plugins", None) or []
        recipe = _collect(errors, structure, cls, data, "", source)
        if isinstance(raw_plugins, list):
            entries = _collect(errors, convert, list, raw_plugins, "plugins", source) or ()
        else:  # the same message as an override that met it first, so it is reported once
            errors.append(_not_a_plugin_list(raw_plugins, source))
            entries = ()
        specs = tuple(s for s in (_collect(errors, _plugin_spec, e, i, source) for i, e in enumerate(entries)) if s)
        # composition is judged on every entry naming a known plugin, options valid or not, so that
        # a conflict is reported together with the file's other mistakes
        errors += composition_errors([_entry_name(e) for e in entries], source)
        if errors:
            raise ConfigError.combine(errors)
        overridden = frozenset(k for k in LENGTH_KEYS if f"generation.{k}" in given)
        return attrs.evolve(recipe, plugins=specs, source=source, overridden=overridden)

    def resolved(self, model_generation: dict | None = None, model_source: str = "the model") -> Recipe:
        """This recipe with gen_length, block_length and steps set (generation.py): its own keys over
        those of the model's generation_config.json (`model_generation`, read from `model_source`)
        over the library defaults."""
        levels = [(model_source, model_lengths(model_generation, model_source)),
                  (self.source, {k: getattr(self.generation, k) for k in LENGTH_KEYS if k not in self.overridden}),
                  (f"{self.source} override", {k: getattr(self.generation, k) for k in self.overridden})]
        lengths = resolve(levels, self.source)
        return attrs.evolve(self, generation=attrs.evolve(self.generation, **lengths))

    def for_model(self, model) -> Recipe:
        """`resolved` for a loaded model (its `generation_config` and `source` as load_model sets them)."""
        source = getattr(model, "source", None)
        where = f"{source}/generation_config.json" if source is not None else "the model's generation_config"
        return self.resolved(getattr(model, "generation_config", None), where)

    def with_overrides(self, overrides: list[str]) -> Recipe:
        return Recipe.from_dict(self.to_dict(), source=self.source, overrides=overrides)

    def to_dict(self) -> dict:
        out = attrs.asdict(self, recurse=True, filter=lambda a, v: a.name not in ("source", "plugins", "overridden"))
        out["generation"]["stop"] = list(self.generation.stop)
        out["plugins"] = [{"name": p.name, **attrs.asdict(p.options)} for p in self.plugins]
        return out

    def instantiate_plugins(self):
        """Fresh plugin instances for this recipe, the default decoding policy added when none is named."""
        from ..core.registry import DEFAULT_POLICY

        classes = available_plugins()
        plugins = [classes[p.name](p.options) for p in self.plugins]
        if not any("commit_policy" in p.provides for p in plugins):
            plugins.insert(0, classes[DEFAULT_POLICY]())
        return plugins


BASELINE_HELP = ("default: the baseline recipe, as recipes/baseline.yaml: the default policy, one token per "
                 "step, the model's answer length")


def baseline_recipe() -> Recipe:
    """The recipe `generate`, `serve` and `eval` use without --recipe: recipes/baseline.yaml (the
    default policy, one token per step, the model's answer length)."""
    return Recipe(name="baseline", source="<the baseline recipe>")


def recipe_or_baseline(path, overrides: list[str] | None = None) -> Recipe:
    """The recipe file at `path` with `overrides`, or the baseline recipe with them when `path` is None."""
    if path is None:
        return baseline_recipe().with_overrides(list(overrides or ()))
    return Recipe.from_yaml(path, overrides=overrides)


def _overrides_over_file(data: dict, in_file, given: set[str], source: str) -> None:
    """The length keys of --set overrides (`given`: the keys they set) over the file's, by
    generation.py's rules: a file's steps follows an overridden gen_length, its block_length is cut to it."""
    generation = data.get("generation")
    if not isinstance(generation, dict) or not isinstance(in_file, dict):
        return
    values, origins = {}, {}
    layer(values, origins, {k: in_file.get(k) for k in LENGTH_KEYS}, source)
    layer(values, origins, {k: generation.get(k) for k in LENGTH_KEYS if f"generation.{k}" in given}, "--set")
    for key in LENGTH_KEYS:
        generation.pop(key, None)
    generation.update(values)


def _not_a_plugin_list(plugins, source: str) -> ConfigError:
    example = plugins if isinstance(plugins, str) else "dual_cache"
    return ConfigError(f"{source}: plugins = {shown(plugins)}: expected a list of plugins such as [{{name: {example}}}]")


def _collect(errors: list, fn, *args):
    """fn(*args), or None with its ConfigError appended to `errors`."""
    try:
        return fn(*args)
    except ConfigError as exc:
        errors.append(exc)
        return None


def _plugin_spec(entry, index: int, source: str) -> PluginSpec:
    path = f"plugins[{index}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{source}: {path} = {shown(entry)}: expected a mapping with a 'name' key")
    classes = available_plugins()
    name = entry["name"]
    if not isinstance(name, str) or name not in classes:
        raise ConfigError(f"{source}: {path}.name = {shown(name)}: unknown plugin; available: {sorted(classes)}")
    options = {k: v for k, v in entry.items() if k != "name"}
    return PluginSpec(name=name, options=structure(classes[name].Options, options, path, source))


def _entry_name(entry):
    """The plugin a `plugins:` entry names, None for an entry that names none."""
    if isinstance(entry, str):
        return entry
    return entry.get("name") if isinstance(entry, dict) else None


def composition_errors(names: list, source: str) -> list[ConfigError]:
    """Every composition problem of a plugin list (`names[i]` is entry i's plugin; names that are
    not registered plugins, reported elsewhere, are left out): a plugin named twice, two owners of a
    decision, a declared conflict (once per pair, whichever of the two declares it)."""
    classes = available_plugins()
    errors, owners, pairs = [], {}, set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in classes:
            continue
        if name in names[:i]:
            errors.append(ConfigError(f"{source}: plugins[{i}].name = {name!r}: plugin listed twice"))
            continue
        for decision in sorted(classes[name].provides):
            if decision in owners:
                errors.append(ConfigError(f"{source}: plugins: {owners[decision]!r} and {name!r} both decide "
                                          f"{decision!r}; keep one of them"))
            else:
                owners[decision] = name
        for other, why in classes[name].conflicts.items():
            if other in names and frozenset((name, other)) not in pairs:
                pairs.add(frozenset((name, other)))
                errors.append(ConfigError(f"{source}: plugins: {name!r} cannot be combined with {other!r}: {why}"))
    return errors


def apply_override(data: dict, item: str, source: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to nested `data`; plugins are addressed by name:
    `plugins.threshold_decoding.threshold=0.8`."""
    if "=" not in item:
        raise ConfigError(f"{source}: --set {shown(item)}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    key = key if len(key) <= 80 else shown(key)
    value = parse_yaml(raw, f"{source}: --set {key}={raw if len(raw) <= 80 else f'{raw[:60]}... ({len(raw)} characters)'}", value=True)
    parts = key.strip().split(".")
    if parts[0] == "plugins" and len(parts) >= 3:
        plugins = data.setdefault("plugins", []) or []
        if not isinstance(plugins, list):
            raise _not_a_plugin_list(plugins, source)
        names = [p if isinstance(p, str) else p.get("name") if isinstance(p, dict) else None for p in plugins]
        if parts[1] not in names:
            raise ConfigError(f"{source}: --set {key}: the recipe has no plugin {parts[1]!r}; "
                              f"its plugins: {[n for n in names if n is not None]}")
        at = names.index(parts[1])
        if isinstance(plugins[at], str):  # a plugin named alone (`- dual_cache`) takes options as a mapping
            plugins[at] = {"name": plugins[at]}
        target, parts = plugins[at], parts[2:]
    else:
        target = data
    for part in parts[:-1]:
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: --set {key}: {part!r} is not a mapping")
        target = nxt
    target[parts[-1]] = value


# keyword overrides of a recipe's generation settings (`Pipeline.generate(..., steps=64)`), checked
# exactly as the recipe's `generation:` keys are; `max_new_tokens` (the Hugging Face name) means `gen_length`
ALIASES = {"max_new_tokens": "gen_length"}


def generation_with_overrides(generation, overrides: dict, source: str):
    """`generation` (a resolved GenerationConfig) with `overrides` applied and validated, the length
    keys by generation.py's rules (steps follows a new gen_length unless given); errors name the keyword."""
    data = attrs.asdict(generation)
    data["stop"] = list(generation.stop)
    for alias, ours in ALIASES.items():
        if alias in overrides and ours in overrides:
            raise ConfigError(f"{source}: generate() keyword arguments: {alias} and {ours} both given; {alias} "
                              f"means {ours}: give one")
    overrides = {ALIASES.get(key, key): value for key, value in overrides.items()}
    where = f"{source} (generate() keyword arguments)"
    checked = structure(type(generation), {**data, **dict.fromkeys(LENGTH_KEYS), **overrides}, "generation", where)
    lengths = resolve([(source, {k: getattr(generation, k) for k in LENGTH_KEYS}),
                       ("generate() keyword arguments", {k: getattr(checked, k) for k in LENGTH_KEYS})], where)
    return attrs.evolve(checked, **lengths)


def recipe_notes(recipe) -> list[str]:
    """Settings that are valid but rarely what a user means, one line each naming the recipe's source
    and key (`recipe check` and `generate` print them)."""
    g = recipe.generation
    notes = []
    if g.steps is not None and g.gen_length is not None and g.steps > g.gen_length:
        notes.append(f"{recipe.source}: generation.steps = {g.steps} exceeds gen_length = {g.gen_length}: with a "
                     f"fixed-step schedule some forwards commit no token (steps <= gen_length gives at least one "
                     f"token per forward)")
    return notes


def read_recipe_file(path: str | Path):
    """A recipe file's YAML document, refused when the file is empty (most likely saved before it was
    written): a recipe is a mapping, and `{}` is the way to take every default."""
    data = read_yaml_file(path, "recipe file")
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a recipe is a mapping of keys such as name, model, "
                          f"generation, plugins ({{}} takes every default)")
    return data
