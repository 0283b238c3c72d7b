"""Compiled execution decodes exactly as eager, for every shipped recipe and both families.

The step forward is captured whole (`fullgraph=True`: a graph break is an error) with the
`aot_eager` backend, which traces and functionalises the forward exactly as inductor's front end
does but runs the captured graph with eager kernels: the proof of capture without paying
inductor's compile time. One recipe also runs through inductor itself. Float32 golden checkpoints,
a left-padded batch of two prompts.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.core.registry import available_plugins
from dare_pipeline.execution import executor as executor_module
from dare_pipeline.plugin_kit.testing import tiny_model

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
GEN = ["generation.gen_length=32", "generation.block_length=16", "generation.steps=32"]
PROMPTS = [[5, 17, 3, 9, 11, 2], [40, 8, 21]]
# recipes whose reuse objects select rows with data-dependent shapes and so still run eagerly
NOT_CAPTURABLE: set[str] = set()  # reuse plugins that still run their forwards eagerly


def _decode(model, recipe_path: Path, execution: list[str]):
    recipe = Recipe.from_yaml(recipe_path, overrides=GEN + execution)
    return Pipeline(model, recipe).generate(PROMPTS)


def _guide_for(model, recipe_path: Path, folder: Path) -> list[str]:
    """A guided recipe's guide replaced by a tiny random one of the golden model's vocabulary (the
    plugin's contract options: the embedded guide's tokenizer is not the golden models')."""
    if "guided_diffusion" not in {p.name for p in Recipe.from_yaml(recipe_path).plugins}:
        return []
    options = available_plugins()["guided_diffusion"].contract_options(model, folder)
    return [f"plugins.guided_diffusion.{key}={value}" for key, value in options.items()]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_compiled_decode_equals_eager(golden_models, family, recipe, tmp_path):
    model = golden_models[family]
    guide = _guide_for(model, recipe, tmp_path)
    eager = _decode(model, recipe, guide)
    compiled = _decode(model, recipe, guide + ["execution.mode=compiled", "execution.backend=aot_eager"])
    assert compiled.sequences == eager.sequences
    assert compiled.unmask_step == eager.unmask_step
    assert compiled.stats.nfe == eager.stats.nfe
    assert compiled.stats.execution["mode"] == "compiled"
    if recipe.stem in NOT_CAPTURABLE:
        assert compiled.stats.execution["eager_forwards"] == compiled.stats.nfe
        assert "not capturable" in compiled.stats.execution["eager_reason"]
    else:
        assert compiled.stats.execution["eager_forwards"] == 0, compiled.stats.execution


def test_inductor_compiles_a_cached_decode_exactly(golden_models):
    model = golden_models["llada"]
    recipe = Path(__file__).parents[2] / "recipes" / "dual_cache_threshold_dare_kv.yaml"
    eager = _decode(model, recipe, [])
    compiled = _decode(model, recipe, ["execution.mode=compiled", "execution.backend=inductor"])
    assert compiled.sequences == eager.sequences and compiled.unmask_step == eager.unmask_step
    assert compiled.stats.execution["eager_forwards"] == 0


def test_compilation_is_paid_once_per_process_and_shape():
    # a shape no other test compiles (compiled code is shared by models of one architecture)
    model = tiny_model("dream", seed=3, d_model=40, n_heads=4, n_layers=2)
    recipe = Path(__file__).parents[2] / "recipes" / "dual_cache.yaml"
    mode = ["execution.mode=compiled", "execution.backend=aot_eager"]
    first = _decode(model, recipe, mode + ["generation.seed=1"])
    again = _decode(model, recipe, mode + ["generation.seed=1"])  # a new Pipeline, same model and shapes
    assert first.stats.execution["compiles"] >= 1 and first.stats.execution["compile_time_s"] > 0
    assert again.stats.execution["compiles"] == 0 and again.stats.execution["compile_time_s"] == 0
    assert again.sequences == first.sequences


@pytest.mark.parametrize("name, sub_op", [("dare_kv", "kv"), ("ffn_reuse", "ffn")])
def test_rows_counted_under_capture_are_the_rows_computed(golden_models, name, sub_op):
    """DARE-KV (FFN reuse) with a row budget computes exactly `capacity` K/V (FFN) rows per layer,
    and says so."""
    model = golden_models["llada"]
    recipe = Path(__file__).parents[2] / "recipes" / f"{name}.yaml"
    out = _decode(model, recipe, ["execution.mode=compiled", "execution.backend=aot_eager",
                                  f"plugins.{name}.row_budget=0.25", f"plugins.{name}.threshold=0.5"])
    rows = out.stats.rows_by_layer()
    full = out.stats.rows_fed  # every forward feeds the whole canvas (no row feeder)
    assert all(layer["q"] == full for layer in rows)
    assert all(layer[sub_op] < full for layer in rows)  # fewer rows ran the sub-operation than were fed
    # the first forward recomputes every row; every later one ceil(0.25 x rows) at each layer
    per_forward, forwards = full // out.stats.nfe, out.stats.nfe
    batch = len(PROMPTS)
    budget = batch * -(-per_forward // batch // 4)
    assert all(layer[sub_op] == per_forward + (forwards - 1) * budget for layer in rows)
    report = out.stats.plugins[name]
    assert report["row_budget"] == 0.25 and report["rows_reused"] > 0


def test_cuda_graphs_on_a_cpu_model_is_a_clear_error(golden_models):
    recipe = Recipe.from_dict({"execution": {"mode": "cuda_graphs"}}, source="r.yaml")
    with pytest.raises(ConfigError, match="r.yaml: execution.mode = 'cuda_graphs' needs a CUDA device"):
        Pipeline(golden_models["llada"], recipe)


def test_execution_section_is_validated():
    with pytest.raises(ConfigError, match="execution: mode = 'fast': allowed values"):
        Recipe.from_dict({"execution": {"mode": "fast"}})
    with pytest.raises(ConfigError, match="backend"):
        Recipe.from_dict({"execution": {"backend": "tensorrt"}})


def test_auto_is_eager_on_the_cpu(golden_models):
    out = Pipeline(golden_models["llada"], {"generation": {"gen_length": 8, "block_length": 8, "steps": 8}}) \
        .generate([[1, 2, 3]])
    assert out.stats.execution["mode"] == "eager" and out.stats.execution["compiles"] == 0


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("name", ["dare_kv", "dare_o", "ffn_reuse"])
def test_threshold_zero_with_a_row_budget_is_the_recipe_without_the_plugin(golden_models, family, name):
    model = golden_models[family]
    recipe = Path(__file__).parents[2] / "recipes" / "dual_cache.yaml"
    plain = _decode(model, recipe, [])
    plugins = f"plugins=[{{name: dual_cache}}, {{name: {name}, threshold: 0.0, row_budget: 0.25}}]"
    captured = _decode(model, recipe, ["execution.mode=compiled", "execution.backend=aot_eager", plugins])
    assert captured.sequences == plain.sequences and captured.unmask_step == plain.unmask_step
    assert captured.stats.plugins[name]["rows_reused"] == 0


def test_a_compiled_executor_does_not_keep_its_model_alive():
    model = tiny_model("llada", seed=1, d_model=40, n_layers=2)
    alive = weakref.ref(model)
    pipe = Pipeline(model, {"generation": {"gen_length": 8, "block_length": 8, "steps": 8},
                            "plugins": [{"name": "dare_kv"}], "execution": {"mode": "compiled", "backend": "aot_eager"}})
    pipe.generate([[1, 2, 3]])
    del pipe, model
    gc.collect()
    assert alive() is None


def test_each_model_has_its_own_recompile_limit(monkeypatch):
    """Dynamo stops compiling a code object after `recompile_limit` graphs; many models in one process
    (a test suite, a server) must not use up each other's."""
    monkeypatch.setattr(executor_module, "_RECOMPILE_LIMIT", 2)
    # torch's config module answers a delete by hiding the key, so it is patched the way torch supports
    # (monkeypatch's undo deletes a name it did not find in the object's __dict__)
    with torch._dynamo.config.patch(recompile_limit=2):
        gen = {"gen_length": 8, "block_length": 8, "steps": 8}
        for width in (24, 32, 40, 56):  # four architectures: one graph each, more than the limit together
            model = tiny_model("dream", seed=2, d_model=width, n_heads=4, n_layers=1)
            out = Pipeline(model, {"generation": gen, "execution": {"mode": "compiled", "backend": "aot_eager"}}) \
                .generate([[1, 2, 3]])
            assert out.stats.execution["compiles"] >= 1
