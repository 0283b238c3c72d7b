"""Ablation files: a base recipe, a model, evaluation tasks, and the axes whose product is run.

    name: fastdllm_table
    recipe: ../recipes/baseline.yaml     # base recipe (relative to this file), or an inline mapping
    model: default                       # overrides the recipe's model (the CLI's --model overrides this)
    tasks: [dare_suite]
    limit: 2                             # problems per task (the CLI's --limit overrides this)
    batch_size: 4
    set: [generation.gen_length=64, generation.steps=64]     # overrides of the base recipe
    plugin_options:                      # options a plugin gets whenever a run switches it on
      threshold_decoding: {threshold: 0.9}
    plugins:                             # the sets of plugins switched on, one run (or sweep) each
      subsets_of: [[prefix_cache, dual_cache], threshold_decoding]
    sweep:                               # parameter sweeps, applied as a product
      plugins.threshold_decoding.threshold: [0.7, 0.9]
      generation.gen_length,generation.steps: [[64, 64], [128, 128]]   # tied keys move together
      plugins.dare_kv.target_reuse: [0.5, 0.8]   # calibrated per run (calibrated.py), not an option
    calibration: {prompts: prompts.jsonl, limit: 8}  # what target_reuse calibrates on (optional)
    repeats: 3                           # timed passes per run after its first (the CLI's --repeats)
    timing_limit: 2                      # problems per task of the timed passes (default: the limit)

Every error names the file, the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import attrs

from ...config.files import check_nesting, read_yaml_file
from ...config.loading import ConfigError, at_least, in_range, structure
from ...config.recipe import Recipe, apply_override, composition_errors, read_recipe_file
from ...core.registry import available_plugins
from .calibrated import is_target_key


def _str_or_mapping(value, path: str, source: str):
    if value is None or isinstance(value, (str, dict)):
        return value
    raise ConfigError(f"{source}: {path} = {value!r}: expected a recipe file path or a recipe mapping")


@attrs.frozen(kw_only=True)
class PluginAxis:
    # every subset of these; an inner list means "at most one of these" (e.g. [prefix_cache, dual_cache])
    subsets_of: tuple[str | tuple[str, ...], ...] = ()
    # explicit sets, run in addition to the subsets (e.g. [[], [dual_cache, threshold_decoding]])
    sets: tuple[tuple[str, ...], ...] = ()
    # keep only sets with this many plugins (inclusive); None = no upper bound
    min_size: int = attrs.field(default=0, validator=at_least(0))
    max_size: int | None = attrs.field(default=None, validator=at_least(0))

    def expand(self) -> list[tuple[str, ...]]:
        """The plugin sets, in a deterministic order: subsets first (by size, then in axis order),
        then the explicit sets; duplicates (same plugins in any order) dropped."""
        out: list[tuple[str, ...]] = []
        if self.subsets_of:
            groups = [(g,) if isinstance(g, str) else tuple(g) for g in self.subsets_of]
            # each group contributes nothing or one of its members
            choices = [(None,) + g for g in groups]
            combos = [tuple(n for n in pick if n is not None) for pick in itertools.product(*choices)]
            order = {n: i for i, n in enumerate(n for g in groups for n in g)}
            combos.sort(key=lambda c: (len(c), [order[n] for n in c]))
            out.extend(combos)
        out.extend(tuple(s) for s in self.sets)
        if not self.subsets_of and not self.sets:
            out.append(())
        seen, unique = set(), []
        for s in out:
            key = frozenset(s)
            if key in seen:
                continue
            if len(s) < self.min_size or (self.max_size is not None and len(s) > self.max_size):
                continue
            seen.add(key)
            unique.append(s)
        return unique


@attrs.frozen(kw_only=True)
class CalibrationSpec:
    """How a `target_reuse` sweep value becomes a threshold (see calibrated.py)."""

    # JSONL prompts file, relative to the ablation file; None: the packaged held-out problems of the tasks
    prompts: str | None = None
    limit: int = attrs.field(default=8, validator=at_least(1))  # the first N prompts
    tolerance: float = attrs.field(default=0.01, validator=in_range(0.0, 1.0))  # accepted |reuse - target|
    max_trials: int = attrs.field(default=16, validator=at_least(1))  # decodes of the prompts at most


@attrs.frozen(kw_only=True)
class Ablation:
    name: str
    description: str = ""
    # the base recipe: a YAML path (relative to the ablation file) or an inline recipe mapping;
    # None = the baseline settings (recipes/baseline.yaml)
    recipe: Any = None
    model: str | None = None
    tasks: tuple[str, ...] = ("dare_suite",)
    limit: int | float | None = attrs.field(default=None, validator=at_least(0, strict=True))
    batch_size: int = attrs.field(default=1, validator=at_least(1))
    set: tuple[str, ...] = ()
    plugin_options: dict = attrs.Factory(dict)
    plugins: PluginAxis = attrs.Factory(PluginAxis)
    sweep: dict = attrs.Factory(dict)
    # the accuracy metric the report shows (exact_match or final_match)
    metric: str = "exact_match"
    # timed passes per run after its first (accuracy) pass, round-robin across the runs (--repeats)
    repeats: int = attrs.field(default=3, validator=at_least(0))
    # problems per task of the timed passes (the first N of the ones the accuracy pass decodes);
    # None = the limit (--timing-limit)
    timing_limit: int | float | None = attrs.field(default=None, validator=at_least(0, strict=True))
    calibration: CalibrationSpec = attrs.Factory(CalibrationSpec)
    source: str = attrs.field(default="<dict>", eq=False)

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> Ablation:
        return cls.from_dict(read_yaml_file(path, "ablation file"), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> Ablation:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level: expected a mapping, got {type(data).__name__}")
        check_nesting(data, source)  # before copying: deepcopy recurses
        data = copy.deepcopy(data)
        errors: list[ConfigError] = []  # every mistake of the file, reported at once
        if "name" not in data:
            errors.append(ConfigError(f"{source}: name: missing; every ablation needs a name"))
        if _collected(errors, _str_or_mapping, data.get("recipe"), "recipe", source) is _FAILED:
            data.pop("recipe")
        if isinstance(data.get("tasks"), str):
            data["tasks"] = [t.strip() for t in data["tasks"].split(",") if t.strip()]
        abl = _structure_valid_keys(cls, data, source, errors)
        for check in (_check_metric, _check_plugin_options, _check_sweep, _check_plugin_names, _check_targets,
                      _check_set, _check_tasks):
            _collected(errors, check, abl, source)
        if errors:
            raise ConfigError.combine(errors)
        return attrs.evolve(abl, source=source)

    @property
    def sweep_entries(self) -> list[SweepEntry]:
        return _parse_sweep(self.sweep, self.source)

    def base_recipe_dict(self, model: str | None = None, extra_set: list[str] | tuple[str, ...] = ()) -> dict:
        """The base recipe as a plain dict, with the file's `set` overrides, then `extra_set`, and the
        model (argument, else the file's `model`) applied; validated once here."""
        if self.recipe is None:
            data: dict = {"name": "baseline"}
            src = f"{self.source}: recipe <baseline defaults>"
        elif isinstance(self.recipe, dict):
            data = copy.deepcopy(self.recipe)
            src = f"{self.source}: recipe"
        else:
            path = Path(self.recipe)
            if not path.is_absolute():
                path = Path(self.source).parent / path
            if not path.exists():
                raise ConfigError(f"{self.source}: recipe = {self.recipe!r}: recipe file not found (looked at {path})")
            data = read_recipe_file(path)
            src = str(path)
        for item in list(self.set) + list(extra_set):
            apply_override(data, item, src)
        chosen = model or self.model
        if chosen is not None:
            data["model"] = chosen
        data["plugins"] = [p if isinstance(p, dict) else {"name": p} for p in (data.get("plugins") or [])]
        Recipe.from_dict(data, source=src)  # fail early, with the recipe's own messages
        return data


_FAILED = object()


def _collected(errors: list, check, *args):
    """check(*args), or _FAILED with its ConfigError appended to `errors`."""
    try:
        return check(*args)
    except ConfigError as exc:
        errors.append(exc)
        return _FAILED


def _structure_valid_keys(cls, data: dict, source: str, errors: list):
    """The Ablation of `data`; with mistakes, they go to `errors` and the instance is built from the
    keys that are valid on their own, so that the checks that follow still see the rest of the file."""
    try:
        return structure(cls, data, "", source)
    except ConfigError as exc:
        errors.append(exc)
    placeholder = {"name": ""}
    valid = {k: v for k, v in data.items()
             if _collected([], structure, cls, {**placeholder, k: v}, "", source) is not _FAILED}
    return structure(cls, {**placeholder, **valid}, "", source)


def _check_metric(abl: Ablation, source: str) -> None:
    allowed = ("exact_match", "final_match")
    if abl.metric not in allowed:
        raise ConfigError(f"{source}: metric = {abl.metric!r}: allowed values: {list(allowed)}")


def _check_plugin_options(abl: Ablation, source: str) -> None:
    for name, opts in abl.plugin_options.items():
        if not isinstance(name, str):
            raise ConfigError(f"{source}: plugin_options: key {name!r}: expected a plugin name")
        if not isinstance(opts, dict):
            raise ConfigError(f"{source}: plugin_options.{name} = {opts!r}: expected a mapping of options")
        if "name" in opts:
            raise ConfigError(f"{source}: plugin_options.{name}.name: not an option (the key is the plugin name)")


def _check_sweep(abl: Ablation, source: str) -> None:
    _parse_sweep(abl.sweep, source)  # validates the sweep's shape


def _check_set(abl: Ablation, source: str) -> None:
    for i, item in enumerate(abl.set):
        if "=" not in item:
            raise ConfigError(f"{source}: set[{i}] = {item!r}: expected KEY.PATH=VALUE")


def _check_tasks(abl: Ablation, source: str) -> None:
    if not abl.tasks:
        raise ConfigError(f"{source}: tasks: empty; name at least one task (e.g. dare_suite)")


def _check_plugin_names(abl: Ablation, source: str) -> None:
    """Every plugin the file names is registered: a typo is an error here, not runs recorded as
    skipped."""
    import difflib

    classes = available_plugins()
    named = []  # (where, name)
    for i, group in enumerate(abl.plugins.subsets_of):
        for name in ([group] if isinstance(group, str) else group):
            named.append((f"plugins.subsets_of[{i}]", name))
    for i, plugin_set in enumerate(abl.plugins.sets):
        named += [(f"plugins.sets[{i}]", name) for name in plugin_set]
    named += [(f"plugin_options.{name}", name) for name in abl.plugin_options]
    with contextlib.suppress(ConfigError):  # a sweep of the wrong shape is _check_sweep's to report
        for e in _parse_sweep(abl.sweep, source):
            named += [(f"sweep.{k}", e.plugin_of(k)) for k in e.keys if e.plugin_of(k) is not None]
    errors = []
    for where, name in named:
        if name not in classes:
            close = difflib.get_close_matches(str(name), list(classes), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(ConfigError(f"{source}: {where}: unknown plugin {name!r}{hint} (registered plugins: "
                                      f"{sorted(classes)})"))
    if errors:
        raise ConfigError.combine(errors)


def _check_targets(abl: Ablation, source: str) -> None:
    """`plugins.<dare plugin>.target_reuse` sweeps: a DARE plugin, values in (0, 1), no threshold
    sweep of the same plugin beside it, and a prompts file that exists."""
    from ..calibration import DARE_PLUGINS
    from .calibrated import is_target_key

    keys = [k for e in _parse_sweep(abl.sweep, source) for k in e.keys]
    targets = [k for k in keys if is_target_key(k)]
    for e in _parse_sweep(abl.sweep, source):
        for i, k in enumerate(e.keys):
            if not is_target_key(k):
                continue
            plugin = e.plugin_of(k)
            if plugin not in DARE_PLUGINS:
                raise ConfigError(f"{source}: sweep.{k}: target_reuse is calibrated for {list(DARE_PLUGINS)} only")
            if f"plugins.{plugin}.threshold" in keys:
                raise ConfigError(f"{source}: sweep.{k}: sweep either {plugin}'s threshold or its target_reuse "
                                  f"(the target sets the threshold)")
            for j, point in enumerate(e.values):
                v = point[i]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                    raise ConfigError(f"{source}: sweep.{k}[{j}] = {v!r}: a reuse fraction between 0 and 1, both "
                                      f"excluded")
    if targets and abl.calibration.prompts is not None:
        path = calibration_prompts_path(abl)
        if not path.is_file():
            raise ConfigError(f"{source}: calibration.prompts = {abl.calibration.prompts!r}: prompts file not found "
                              f"(looked at {path})")


def calibration_prompts_path(abl: Ablation) -> Path | None:
    if abl.calibration.prompts is None:
        return None
    path = Path(abl.calibration.prompts)
    return path if path.is_absolute() else Path(abl.source).parent / path


@attrs.frozen
class SweepEntry:
    keys: tuple[str, ...]  # one key, or several tied keys ("a.b,c.d")
    values: tuple[tuple, ...]  # one tuple of values per point, aligned with keys

    def plugin_of(self, key: str) -> str | None:
        parts = key.split(".")
        return parts[1] if parts[0] == "plugins" and len(parts) >= 3 else None


def _parse_sweep(sweep: dict, source: str) -> list[SweepEntry]:
    entries = []
    for raw_key, values in sweep.items():
        path = f"sweep.{raw_key}"
        if not isinstance(raw_key, str) or not raw_key.strip():
            raise ConfigError(f"{source}: sweep: key {raw_key!r}: expected a dotted key such as generation.gen_length")
        keys = tuple(k.strip() for k in raw_key.split(","))
        for k in keys:
            parts = k.split(".")
            if not all(parts) or (parts[0] == "plugins" and len(parts) < 3):
                raise ConfigError(f"{source}: {path}: {k!r} is not a KEY.PATH (plugins are addressed as "
                                  f"plugins.<name>.<option>)")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: {path} = {values!r}: expected a non-empty list of values")
        points = []
        for i, v in enumerate(values):
            if len(keys) == 1:
                points.append((v,))
            elif isinstance(v, list) and len(v) == len(keys):
                points.append(tuple(v))
            else:
                raise ConfigError(f"{source}: {path}[{i}] = {v!r}: tied keys {list(keys)} need a list of "
                                  f"{len(keys)} values per point")
        entries.append(SweepEntry(keys, tuple(points)))
    return entries


# ---- planning: the runs of an ablation --------------------------------------------------------

@attrs.frozen(kw_only=True)
class RunSpec:
    index: int  # position in the ablation's deterministic run order (sharding uses it)
    key: str  # stable hash of the resolved recipe + tasks + limit + batch size
    label: str  # the plugin set: "baseline" or "prefix_cache+threshold_decoding"
    plugins: tuple[str, ...]  # the plugins this run switched on (the axis), base recipe plugins excluded
    sweep: dict  # the sweep values applied to this run (keys of absent plugins are not applied)
    recipe: dict | None  # Recipe.to_dict() when the recipe loads; the raw dict otherwise
    tasks: tuple[str, ...]
    limit: int | float | None
    batch_size: int
    status: str = "pending"  # pending | skipped (refused, unknown plugin) | failed (recipe does not load)
    reason: str | None = None
    error: dict | None = None
    calibrate: dict | None = None  # a target_reuse to calibrate before the run (calibrated.py)
    timing_limit: int | float | None = None  # problems per task of the timed passes (None: limit)

    @property
    def name(self) -> str:
        """The label with this run's sweep values."""
        if not self.sweep:
            return self.label
        return f"{self.label} [" + ", ".join(f"{_short(k)}={v}" for k, v in self.sweep.items()) + "]"


def _short(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "plugins" and len(parts) >= 3:
        return ".".join(parts[1:])
    return parts[-1]


def device_kind(device):
    """`cuda:N` as `cuda`: which GPU of a machine ran a run does not change it (one shard per GPU)."""
    return "cuda" if isinstance(device, str) and device.startswith("cuda:") else device


def run_key(recipe: dict, tasks, limit, batch_size, calibrate: dict | None = None) -> str:
    """Stable hash of what determines a run's results: the recipe (its name and description
    excluded, `cuda:N` counted as `cuda`), the tasks, the limit, the batch size and, for a
    target_reuse run, what it calibrates on."""
    body = {k: v for k, v in recipe.items() if k not in ("name", "description")}
    if "device" in body:
        body["device"] = device_kind(body["device"])
    doc = {"recipe": body, "tasks": list(tasks), "limit": limit, "batch_size": batch_size}
    if calibrate is not None:
        doc["calibrate"] = calibrate
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_runs(abl: Ablation, *, model: str | None = None, limit=None, extra_set=(), batch_size: int | None = None,
              timing_limit=None) -> list[RunSpec]:
    """Every run of the ablation, in order: plugin sets x the sweep values that apply to each.

    A sweep key `plugins.<name>.<opt>` applies only to runs whose plugins include <name>, so a
    threshold sweep does not multiply the runs without that plugin. Runs that resolve to the same
    recipe are kept once. Combinations refused at recipe load (two owners of one decision, declared
    conflicts) and plugins that are not registered come back with status "skipped" and the reason;
    a recipe that fails to load for another reason comes back "failed" with the error."""
    limit = abl.limit if limit is None else limit
    batch_size = abl.batch_size if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r}: must be an integer >= 1")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        shown = f"{limit:g}" if isinstance(limit, (int, float)) and not isinstance(limit, bool) else repr(limit)
        raise ConfigError(f"--limit {shown}: must be > 0 (a number of problems per task, or a share below 1)")
    timing_limit = _timing_limit(abl.timing_limit if timing_limit is None else timing_limit, limit, abl.source)
    base = abl.base_recipe_dict(model=model, extra_set=extra_set)
    base_plugins = [p["name"] for p in base["plugins"]]
    classes = available_plugins()
    entries = abl.sweep_entries
    runs: list[RunSpec] = []
    seen: set[str] = set()
    for plugin_set in abl.plugins.expand():
        present = set(base_plugins) | set(plugin_set)
        label = "+".join(plugin_set) or "baseline"
        applied = []  # (keys, points) restricted to the keys that apply here
        for e in entries:
            keep = [i for i, k in enumerate(e.keys) if e.plugin_of(k) is None or e.plugin_of(k) in present]
            if keep:
                keys = tuple(e.keys[i] for i in keep)
                # points in order, once each; json.dumps keys them, since a value may be a list
                points = list({json.dumps(pt, sort_keys=True): pt
                               for pt in (tuple(p[i] for i in keep) for p in e.values)}.values())
                applied.append((keys, points))
        for combo in itertools.product(*[pts for _, pts in applied]) if applied else [()]:
            sweep = {k: v for (keys, _), point in zip(applied, combo) for k, v in zip(keys, point)}
            data = copy.deepcopy(base)
            data["name"] = label
            data["plugins"] = list(data["plugins"]) + [{"name": n, **copy.deepcopy(abl.plugin_options.get(n, {}))}
                                                       for n in plugin_set]
            common = {"label": label, "plugins": tuple(plugin_set), "sweep": sweep, "tasks": tuple(abl.tasks),
                      "limit": limit, "batch_size": batch_size, "timing_limit": timing_limit}
            spec = _resolve(data, {k: v for k, v in sweep.items() if not is_target_key(k)}, base_plugins, plugin_set,
                            common, abl.source, classes)
            spec["calibrate"] = _calibration(abl, sweep)
            key = run_key(spec["recipe"], abl.tasks, limit, batch_size, spec["calibrate"])
            if key in seen:
                continue
            seen.add(key)
            runs.append(RunSpec(index=len(runs), key=key, **spec))
    return runs


def _timing_limit(timing_limit, limit, source: str):
    """The timed passes' problems per task: a number > 0, at most the limit (they time problems the
    accuracy pass decoded); None when it is the limit."""
    if timing_limit is None:
        return None
    if isinstance(timing_limit, bool) or not isinstance(timing_limit, (int, float)) or not timing_limit > 0:
        raise ConfigError(f"{source}: timing_limit = {timing_limit!r}: must be > 0 (problems per task of the timed "
                          f"passes)")
    if isinstance(timing_limit, float) and timing_limit.is_integer() and timing_limit >= 1:
        timing_limit = int(timing_limit)
    if limit is not None and isinstance(limit, int) == isinstance(timing_limit, int) and timing_limit > limit:
        raise ConfigError(f"{source}: timing_limit = {timing_limit}: above the limit {limit} (the timed passes decode "
                          f"the first of the problems the accuracy pass decodes)")
    return None if timing_limit == limit else timing_limit


def _calibration(abl: Ablation, sweep: dict) -> dict | None:
    """What a run with a target_reuse sweep value calibrates (None without one)."""
    targets = [(k, v) for k, v in sweep.items() if is_target_key(k)]
    if not targets:
        return None
    if len(targets) > 1:
        raise ConfigError(f"{abl.source}: sweep: one target_reuse per run ({[k for k, _ in targets]} together)")
    key, target = targets[0]
    path = calibration_prompts_path(abl)
    c = abl.calibration
    return {"plugin": key.split(".")[1], "target": target, "prompts": None if path is None else str(path.resolve()),
            "limit": c.limit, "tolerance": c.tolerance, "max_trials": c.max_trials, "tasks": list(abl.tasks)}


def _resolve(data: dict, sweep: dict, base_plugins, plugin_set, common: dict, source: str, classes) -> dict:
    where = f"{source} [{common['label']}]"

    def failed(exc):
        return dict(common, recipe=data, status="failed", reason="the run's recipe does not load",
                    error={"type": type(exc).__name__, "message": str(exc), "traceback": ""})

    try:  # on the raw dict first, so every sweep point stays a run of its own even when skipped
        for k, v in sweep.items():
            apply_override(data, f"{k}={json.dumps(v)}", where)
    except ConfigError as exc:
        return failed(exc)
    unknown = [n for n in plugin_set if n not in classes]
    if unknown:
        return dict(common, recipe=data, status="skipped",
                    reason=f"unknown plugin {unknown[0]!r}: not registered (available: {sorted(classes)})")
    refused = composition_errors(list(base_plugins) + list(plugin_set), where)
    if refused:
        return dict(common, recipe=data, status="skipped",
                    reason="refused at recipe load: " + "; ".join(ConfigError.combine(refused).errors))
    try:
        recipe = Recipe.from_dict(data, source=where)
    except ConfigError as exc:
        return failed(exc)
    return dict(common, recipe=recipe.to_dict())
