"""Calibration: pick a DARE plugin's threshold for a target reuse fraction on given prompts.

The DARE paper fixes its threshold by the reuse it wants; the drift scale that gives a reuse
fraction depends on the model, the recipe and the prompts. `calibrate` decodes the prompts with
the recipe at candidate thresholds and measures the plugin's own reuse fraction (rows reused over
rows eligible), bracketing then bisecting the threshold until the measured reuse is within
`tolerance` of the target. One threshold serves every layer (the per-layer drift scales differ,
but a single threshold keeps the rule the paper's and the recipe readable; `exempt_layers`
remains the per-layer knob). The reuse is measured with reuse on, not predicted from drifts
measured without it: a reused row's reference query ages, so the drift of a real run is larger
than consecutive forwards' drift.

Only rows the rule may reuse count as eligible for the target: rows forced to recompute (the
first forward, `refresh_every`, exempt layers) are in the plugin's denominator too, so a target
above what an unbounded threshold reaches is refused with that maximum.
"""

from __future__ import annotations

import math

import attrs

from ..config.loading import ConfigError
from ..config.recipe import Recipe

DARE_PLUGINS = ("dare_kv", "dare_o", "ffn_reuse")  # the plugins of the query-drift rule (QueryDrift)
_BRACKET_LIMIT = 1e3  # a drift ratio beyond any real one
_UNBOUNDED = 1e30  # a threshold every drift is below


@attrs.frozen
class Trial:
    threshold: float
    reuse: float
    nfe: int


@attrs.frozen
class Calibration:
    plugin: str
    target: float
    threshold: float
    reuse: float
    trials: tuple[Trial, ...]
    recipe: Recipe  # the input recipe with the chosen threshold
    converged: bool  # |reuse - target| <= tolerance (else the closest trial: reuse jumps somewhere)


def calibration_plugin(recipe: Recipe, plugin: str | None) -> str:
    """The DARE plugin to calibrate: `plugin`, or the recipe's only one."""
    names = [p.name for p in recipe.plugins if p.name in DARE_PLUGINS]
    if plugin is not None:
        if plugin not in names:
            raise ConfigError(f"{recipe.source}: --plugin {plugin!r}: the recipe has no such DARE plugin; "
                              f"its DARE plugins: {names}")
        return plugin
    if len(names) != 1:
        raise ConfigError(f"{recipe.source}: plugins: calibration needs exactly one of {list(DARE_PLUGINS)} "
                          f"(or --plugin to choose); the recipe has {names}")
    return names[0]


def calibrate(model, recipe: Recipe, prompts: list, target: float, plugin: str | None = None,
              tolerance: float = 0.01, max_trials: int = 16, progress=None, prompt_done=None) -> Calibration:
    """Choose `plugin`'s threshold so its reuse fraction on `prompts` is `target` (+- tolerance).

    `progress(trial)` is called after each trial, `prompt_done(threshold, done, total)` when a trial
    starts (done 0) and after each of its prompts (a trial decodes every prompt once)."""
    if isinstance(target, bool) or not 0.0 < target < 1.0 or math.isnan(target):
        raise ConfigError(f"target_reuse = {target!r}: must be between 0 and 1, both excluded")
    if not prompts:
        raise ConfigError("calibration needs at least one prompt")
    name = calibration_plugin(recipe, plugin)
    trials: list[Trial] = []

    def trial(threshold: float) -> Trial:
        result = _measure(model, recipe, name, threshold, prompts, prompt_done)
        trials.append(result)
        if progress is not None:
            progress(result)
        return result

    def close_enough() -> bool:
        return abs(trials[-1].reuse - target) <= tolerance

    # bracket: grow the threshold until the target is reached, then bisect between the last two
    low, high = 0.0, 0.05
    while trial(high).reuse < target - tolerance:
        plateau = len(trials) >= 3 and trials[-1].reuse == trials[-2].reuse == trials[-3].reuse
        if plateau or high >= _BRACKET_LIMIT or len(trials) >= max_trials:
            ceiling = trial(_UNBOUNDED)
            if ceiling.reuse < target - tolerance:
                raise ConfigError(f"target_reuse = {target}: {name} reuses at most {ceiling.reuse:.3f} of its "
                                  f"eligible rows on these prompts (at an unbounded threshold); the rest are "
                                  f"forced recomputes (first forward, refresh_every, exempt_layers, changed tokens)")
            low, high = high, _UNBOUNDED
            break
        low, high = high, high * 4
    while not close_enough() and len(trials) < max_trials:
        middle = (low + high) / 2
        if trial(middle).reuse < target:
            low = middle
        else:
            high = middle
    best = min(trials, key=lambda x: (abs(x.reuse - target), x.threshold))
    chosen = recipe.with_overrides([f"plugins.{name}.threshold={_yaml_float(best.threshold)}"])
    return Calibration(plugin=name, target=target, threshold=best.threshold, reuse=best.reuse,
                       trials=tuple(trials), recipe=chosen, converged=abs(best.reuse - target) <= tolerance)


def _measure(model, recipe: Recipe, name: str, threshold: float, prompts: list, prompt_done=None) -> Trial:
    from ..api import Pipeline

    pipe = Pipeline(model, recipe.with_overrides([f"plugins.{name}.threshold={_yaml_float(threshold)}"]))
    reused = eligible = nfe = 0
    for done, prompt in enumerate(prompts):
        if prompt_done is not None:
            prompt_done(threshold, done, len(prompts))
        out = pipe.generate([prompt])
        report = out.stats.plugins[name]
        reused += report["rows_reused"]
        eligible += report["rows_eligible"]
        nfe += out.stats.nfe
    if prompt_done is not None:
        prompt_done(threshold, len(prompts), len(prompts))
    return Trial(threshold=threshold, reuse=reused / eligible if eligible else 0.0, nfe=nfe)


def _yaml_float(value: float) -> str:
    """A float as YAML reads it back exactly (YAML 1.1 wants a dot: `1e-05` would be a string)."""
    text = repr(value)
    return text if "." in text else f"{value:.17e}"
