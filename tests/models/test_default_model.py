"""The embedded default models: shipped in the package, loadable offline, and they know the suite.

The accuracy figures on all 500 held-out problems are measured by scripts/eval_heldout.py and
recorded in docs/default_model.md; here a handful of problems keeps the check fast while still
failing for a model that does not reason (an untrained or wrongly loaded one scores 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dare_pipeline import Pipeline, Recipe, load_model
from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score
from dare_pipeline.models.default import EMBEDDED

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = read_jsonl(HELDOUT_FILE)
MAX_BYTES = 25 * 2**20


@pytest.mark.parametrize("name, family", [("default", "llada"), ("default-dream", "dream")])
def test_embedded_checkpoint_is_a_complete_hf_directory(name, family):
    directory = EMBEDDED[name]
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    assert size <= MAX_BYTES, f"{directory} holds {size / 2**20:.1f} MiB"
    model = load_model(name)
    assert model.config.family == family
    assert model.config.max_sequence_length >= 1536
    tok = AutoTokenizer.from_pretrained(directory)  # local files only: no hub access happens
    assert tok.mask_token_id == model.config.mask_token_id
    assert tok.eos_token_id == model.config.eos_token_id


def _decode(name: str, problems: list[dict], generation: dict, plugins: list | None = None) -> list[dict]:
    torch.set_num_threads(1)
    pipe = Pipeline(load_model(name), Recipe.from_dict({"generation": generation, "plugins": plugins or []}))
    out = pipe.generate([p["prompt"] for p in problems])
    return [score(p, text) for p, text in zip(problems, out.text)]


BASELINE = {"gen_length": 64, "block_length": 32, "steps": 64}


def _family(name: str, n: int) -> list[dict]:
    return [p for p in HELDOUT if p["family"] == name][:n]


# Per-family figures on all 500: docs/default_model.md. A few problems per family here.
def test_default_model_solves_held_out_problems_with_the_baseline_recipe():
    problems = _family("reverse", 6) + _family("sort", 6)
    scores = _decode("default", problems, BASELINE)
    assert sum(s["exact_match"] for s in scores) >= 10, scores


def _long_sums(n: int) -> list[dict]:
    # 6-7 operands: the worked steps cross column 32 into the second block; a model trained on
    # i.i.d. masks only (the first shipped one) solved none of these (docs/default_model.md)
    return [p for p in HELDOUT if p["family"] == "add" and p["question"].count("+") >= 5][:n]


@pytest.mark.parametrize("name", ["default", "default-dream"])
def test_default_models_carry_running_sums_across_blocks(name):
    # shipped weights: LLaDA 12 of these 16, Dream 16; the stage-1 weights solved 0 of 24
    scores = _decode(name, _long_sums(16), BASELINE)
    assert sum(s["exact_match"] for s in scores) >= 10, scores


def test_default_model_fills_a_long_canvas_with_eos():
    # trained with the answer padded by EOS to the canvas: a 256-token canvas still ends the answer
    problems = _family("reverse", 4)
    scores = _decode("default", problems, {"gen_length": 256, "block_length": 32, "steps": 256},
                     [{"name": "dual_cache"}])
    assert sum(s["exact_match"] for s in scores) >= 3, scores


def test_dream_twin_knows_the_suite():
    scores = _decode("default-dream", _family("reverse", 6), BASELINE)
    assert sum(s["final_match"] for s in scores) >= 4, scores


def test_readme_main_command_answers_correctly():
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("pip install") and "generate" in ln)
    command = line.split("&&", 1)[1].strip()  # the generate part; the install is this test's setup
    assert command.startswith("dare-pipeline generate")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "#### draziwnohtyp" in out.stdout, out.stdout
    assert "[baseline] nfe=64 " in out.stderr  # the model's answer length, one token per step


def test_eval_heldout_script_scores_a_recipe(tmp_path):
    # the accuracy tables of docs/benchmarks.md come from this script; a recipe's plugins must run
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval_heldout.py"), "--recipe", str(ROOT / "recipes" / "dual_cache_threshold.yaml"),
         "--limit", "4", "--offset", "8", "--batch-size", "2", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [p["name"] for p in result["recipe"]["plugins"]] == ["dual_cache", "threshold_decoding"]
    assert result["generation"] == {"gen_length": 64, "block_length": 32, "steps": 64}
    assert result["overall"]["n"] == 4 and [p["id"] for p in result["problems"]] == [p["id"] for p in HELDOUT[8:12]]
    assert 2 <= result["nfe_per_problem_batched"] < 64  # threshold decoding commits several tokens a step
    assert result["overall"]["exact_match"] >= 0.5, result["problems"]
    assert "recipe dual_cache_threshold" in done.stdout


def _probe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_prompt_use", ROOT / "scripts" / "probe_prompt_use.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_use_probe_separates_a_trained_model_from_an_untrained_one():
    # docs/from_scratch_runs.md dates the copying transition of a training run with this probe
    probe = _probe_module().probe
    model = load_model("default")
    trained = probe(model, HELDOUT, per_family=8, t=0.5, seed=0)
    assert set(trained) == {"add", "sort", "reverse", "expr"}
    assert all(r["gap"] > 1.0 and r["own"] < 0.2 for r in trained.values()), trained
    from dare_pipeline.models import DiffusionTransformer

    torch.manual_seed(0)
    untrained = DiffusionTransformer(model.config).eval()
    blind = probe(untrained, HELDOUT, per_family=8, t=0.5, seed=0)
    assert all(abs(r["gap"]) < 0.1 for r in blind.values()), blind
