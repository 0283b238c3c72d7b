"""Calibration: a DARE threshold chosen for a target reuse, from the Python API and the CLI."""

from __future__ import annotations

import json
import re

import pytest

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.cli import main
from dare_pipeline.config import ConfigError
from dare_pipeline.evaluation.calibration import calibrate
from dare_pipeline.plugin_kit.testing import random_prompts, tiny_model

GEN = {"gen_length": 16, "block_length": 8, "steps": 16}
PROMPTS = random_prompts(3, 64, seed=2, min_len=4, max_len=8, exclude=(62, 63))


def _recipe(*plugins):
    return Recipe.from_dict({"generation": GEN, "plugins": [{"name": "dual_cache"}, *plugins]}, source="r.yaml")


def _reuse(model, recipe, name):
    pipe = Pipeline(model, recipe)
    reports = [pipe.generate([p]).stats.plugins[name] for p in PROMPTS]
    return sum(r["rows_reused"] for r in reports) / sum(r["rows_eligible"] for r in reports)


@pytest.mark.parametrize("name", ["dare_kv", "dare_o", "ffn_reuse"])
def test_the_chosen_threshold_gives_the_target_reuse(name):
    model = tiny_model("llada", seed=3, n_layers=3)
    recipe = _recipe({"name": name})  # dare_o exempts layer 0 (see test_reuse_plugins)
    ceiling = _reuse(model, recipe.with_overrides([f"plugins.{name}.threshold=1.0e+30"]), name)
    target = round(ceiling / 2, 3)
    result = calibrate(model, recipe, PROMPTS, target, tolerance=0.02)
    assert abs(result.reuse - target) <= 0.02 and result.converged
    chosen = {p.name: p.options for p in result.recipe.plugins}[name]
    assert chosen.threshold == result.threshold > 0
    assert _reuse(model, result.recipe, name) == result.reuse  # measured with the recipe it writes
    assert [t.threshold for t in result.trials][:1] == [0.05]


def test_a_reuse_that_jumps_is_reported_as_not_converged():
    # without exempting layer 0, DARE-O's layer-0 queries never drift: any threshold > 0 freezes rows
    model = tiny_model("llada", seed=3, n_layers=3)
    recipe = _recipe({"name": "dare_o", "exempt_layers": [], "recompute_block": False})
    result = calibrate(model, recipe, PROMPTS, 0.3, max_trials=8)
    assert not result.converged and len(result.trials) == 8
    assert result.reuse == min((t.reuse for t in result.trials), key=lambda r: abs(r - 0.3))


def test_an_unreachable_target_names_the_ceiling():
    model = tiny_model("llada", seed=3, n_layers=3)
    with pytest.raises(ConfigError, match=r"target_reuse = 0.99: dare_kv reuses at most 0\.\d+ of its eligible rows"):
        calibrate(model, _recipe({"name": "dare_kv"}), PROMPTS, 0.99)


def test_bad_calibration_requests_are_refused():
    model = tiny_model("llada", seed=3)
    with pytest.raises(ConfigError, match=r"r.yaml: plugins: calibration needs exactly one of \['dare_kv', 'dare_o', 'ffn_reuse'\]"):
        calibrate(model, _recipe(), PROMPTS, 0.5)
    both = _recipe({"name": "dare_kv"}, {"name": "dare_o"})
    with pytest.raises(ConfigError, match="calibration needs exactly one"):
        calibrate(model, both, PROMPTS, 0.5)
    with pytest.raises(ConfigError, match="--plugin 'dare_o': the recipe has no such DARE plugin"):
        calibrate(model, _recipe({"name": "dare_kv"}), PROMPTS, 0.5, plugin="dare_o")
    for target in (0.0, 1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="target_reuse = .*: must be between 0 and 1"):
            calibrate(model, _recipe({"name": "dare_kv"}), PROMPTS, target)


def test_cli_writes_a_recipe_that_loads(tmp_path, golden_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("generation: {gen_length: 16, block_length: 8, steps: 16}\n"
                      "plugins: [{name: dual_cache}, {name: dare_kv, threshold: 0.01}]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('[5, 17, 3, 9]\n{"prompt": [40, 8, 21, 30, 2]}\n\n[7, 7, 7]\n')
    out = tmp_path / "calibrated.yaml"
    code = main(["calibrate", "--recipe", str(recipe), "--prompts", str(prompts), "--target-reuse", "0.2",
                 "--tolerance", "0.05", "--model", str(golden_dir / "llada"), "--output", str(out), "--limit", "2"])
    assert code == 0, capsys.readouterr().err
    text = out.read_text()
    assert text.startswith("# dare_kv.threshold calibrated by `dare-pipeline calibrate`: target reuse 0.2")
    assert " on 2 prompts from " in text.splitlines()[0]  # --limit: the first two of three
    loaded = Recipe.from_yaml(out)
    threshold = {p.name: p.options for p in loaded.plugins}["dare_kv"].threshold
    err = capsys.readouterr().err
    assert threshold != 0.01 and f"threshold {threshold:.6g} gives reuse" in err
    # progress: one line per trial (stderr is no terminal here), as the ablation's display writes them
    trials = [line for line in err.splitlines() if re.match(r"\[\d+/16\] threshold ", line)]
    assert trials and trials[0].startswith("[1/16] threshold 0.05: reuse ")
    assert [int(t[1:t.index("/")]) for t in trials] == list(range(1, len(trials) + 1))
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left


@pytest.mark.parametrize("content, message", [
    ("[1, 2\n", r"p.jsonl:1: not JSON"),
    ('"ok"\n{"question": "no prompt"}\n', r"p.jsonl:2: .*expected a non-empty string"),
    ("[]\n", r"p.jsonl:1: .*expected"),
    ("\n\n", r"p.jsonl: no prompts"),
])
def test_cli_names_the_bad_prompt_line(tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"plugins": [{"name": "dare_kv"}]}))
    assert main(["calibrate", "--recipe", str(recipe), "--prompts", str(prompts), "--target-reuse", "0.5"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_each_trial_reports_its_prompts_as_they_decode():
    model = tiny_model("llada")
    seen = []
    result = calibrate(model, _recipe({"name": "dare_kv"}), PROMPTS, 0.3, max_trials=3,
                       prompt_done=lambda threshold, done, total: seen.append((threshold, done, total)))
    expected = [(t.threshold, done, len(PROMPTS)) for t in result.trials for done in range(len(PROMPTS) + 1)]
    assert seen == expected


def test_on_a_terminal_calibrate_draws_the_ablation_display(tmp_path, golden_dir, capsys, monkeypatch):
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("generation: {gen_length: 16, block_length: 8, steps: 16}\n"
                      "plugins: [{name: dual_cache}, {name: dare_kv}]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("[5, 17, 3, 9]\n[7, 7, 7]\n")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["calibrate", "--recipe", str(recipe), "--prompts", str(prompts), "--target-reuse", "0.2",
                 "--tolerance", "0.05", "--model", str(golden_dir / "llada"), "--max-trials", "4"]) == 0
    err = capsys.readouterr().err
    assert "trials (at most 4)" in err and "[1/4] threshold 0.05: reuse " in err
