"""Sweeping a DARE plugin's `target_reuse`: a sweep value `plugins.dare_kv.target_reuse: [0.5, 0.8]`
is not an option of the plugin; each run resolves it by calibration (dare_pipeline.evaluation.calibration)
before it decodes: the threshold that gives that reuse fraction on the calibration prompts, with
the run's own recipe and model. The run then evaluates with that threshold; its record keeps the
calibration (threshold, measured reuse, trials) and its recipe the chosen threshold.

Calibration prompts (the ablation file's `calibration:` section): a JSONL file (`prompts`, relative
to the ablation file; read as `generate --prompts` reads JSONL: dare_pipeline/prompts/files.py), else the
first `limit` problems of the packaged held-out file whose family is one of the ablation's tasks.
Calibration is deterministic (greedy decoding of fixed prompts), so every pass of a run, in any
process, resolves the same threshold; a process calibrates each run once and keeps the result.
"""

from __future__ import annotations

from ...prompts.files import read_prompts

TARGET_OPTION = "target_reuse"
_CALIBRATED: dict[str, tuple] = {}  # run key -> (recipe dict, calibration record), per process


def is_target_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and parts[0] == "plugins" and parts[2] == TARGET_OPTION


def heldout_prompts(tasks, limit: int) -> list[str]:
    """The first `limit` held-out prompts of the tasks' families (every family for dare_suite)."""
    from ..suite import HELDOUT_FILE, read_jsonl

    families = {t.removeprefix("dare_") for t in tasks if t.startswith("dare_") and t != "dare_suite"}
    rows = [row for row in read_jsonl(HELDOUT_FILE) if not families or row.get("family") in families]
    return [row["prompt"] for row in rows[:limit]]


def calibration_prompts(cal: dict) -> list:
    if cal.get("prompts"):
        return read_prompts(cal["prompts"])[: cal["limit"]]
    return heldout_prompts(cal.get("tasks") or (), cal["limit"])


def resolve(recipe, cal: dict, model, key: str):
    """(the recipe with the calibrated threshold, the calibration's record) for a run."""
    from ...api import Pipeline
    from ...config.recipe import Recipe
    from ..calibration import calibrate

    if key not in _CALIBRATED:
        prompts = calibration_prompts(cal)
        ids = Pipeline(model, recipe).encode(prompts)
        result = calibrate(model, recipe, ids, cal["target"], plugin=cal["plugin"], tolerance=cal["tolerance"],
                           max_trials=cal["max_trials"])
        record = {"plugin": result.plugin, "target_reuse": result.target, "threshold": result.threshold,
                  "reuse": result.reuse, "converged": result.converged, "prompts": cal.get("prompts") or
                  "held-out problems of the tasks", "n_prompts": len(ids), "trials": len(result.trials)}
        _CALIBRATED[key] = (result.recipe.to_dict(), record)
    data, record = _CALIBRATED[key]
    return Recipe.from_dict(data, source=recipe.source), dict(record)
