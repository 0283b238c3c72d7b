"""Compile regions: each layer's repeated sub-operations are compiled once, and a failing region
compile falls back to compiling every layer inline with the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.execution import executor as executor_module
from dare_pipeline.execution import regions
from dare_pipeline.plugin_kit.testing import tiny_model

pytestmark = pytest.mark.skipif(not regions.AVAILABLE, reason="this torch has no nested compile regions")

RECIPE = Path(__file__).parents[2] / "recipes" / "dual_cache.yaml"
GEN = ["generation.gen_length=16", "generation.block_length=8", "generation.steps=8"]
REGION_NAMES = ("project_q", "project_k", "project_v", "attend", "swiglu")


def _graphs_of(model, enabled: bool) -> list[torch.fx.GraphModule]:
    """The dynamo graphs of one plain forward, captured with regions on or off."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with regions.regions(enabled):
        torch.compile(type(model).forward, backend=backend, fullgraph=True, dynamic=False)(model, ids)
    return graphs


def _region_calls(graph: torch.fx.GraphModule) -> list[str]:
    """The subgraph each invoke_subgraph call of `graph` runs."""
    return [node.args[0].target for node in graph.graph.nodes
            if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph]


def test_every_layer_runs_one_compiled_copy_of_each_region():
    model = tiny_model("dream", seed=4, d_model=32, n_heads=4, n_layers=3)
    (graph,) = _graphs_of(model, True)
    calls = _region_calls(graph)
    assert len(calls) == 3 * len(REGION_NAMES)  # every layer calls every region
    assert len(set(calls)) == len(REGION_NAMES)  # ... and all layers share one body per region
    (inline,) = _graphs_of(model, False)
    assert _region_calls(inline) == []


def test_regions_decode_exactly_as_eager_and_say_so(golden_models):
    model = golden_models["dream"]
    eager = Pipeline(model, Recipe.from_yaml(RECIPE, overrides=GEN)).generate([[5, 17, 3, 9], [40, 8]])
    compiled = Pipeline(model, Recipe.from_yaml(RECIPE, overrides=GEN + [
        "execution.mode=compiled", "execution.backend=aot_eager"])).generate([[5, 17, 3, 9], [40, 8]])
    assert compiled.sequences == eager.sequences and compiled.unmask_step == eager.unmask_step
    assert compiled.stats.execution["regions"] is True and compiled.stats.execution["regions_error"] is None


def test_regions_off_in_the_recipe(golden_models):
    out = Pipeline(golden_models["llada"], Recipe.from_yaml(RECIPE, overrides=GEN + [
        "execution.mode=compiled", "execution.backend=aot_eager", "execution.regions=false"])).generate([[5, 6]])
    assert out.stats.execution["regions"] is False


def test_a_failing_region_compile_falls_back_to_inline_layers(monkeypatch):
    model = tiny_model("llada", seed=5, d_model=40, n_heads=4, n_layers=2)
    real = executor_module.Executor._compiled_forward

    def regions_break(self, model, forward):
        if self.regions:
            def fail(*args):
                raise torch._dynamo.exc.InternalTorchDynamoError("KeyError: 2")
            return fail
        return real(self, model, forward)

    monkeypatch.setattr(executor_module.Executor, "_compiled_forward", regions_break)
    eager = Pipeline(model, Recipe.from_yaml(RECIPE, overrides=GEN)).generate([[5, 17, 3]])
    with pytest.warns(RuntimeWarning, match="compiling with regions failed .*KeyError: 2.*inline"):
        compiled = Pipeline(model, Recipe.from_yaml(RECIPE, overrides=GEN + [
            "execution.mode=compiled", "execution.backend=aot_eager"])).generate([[5, 17, 3]])
    assert compiled.sequences == eager.sequences
    assert compiled.stats.execution["regions"] is False
    assert "KeyError: 2" in compiled.stats.execution["regions_error"]
    assert compiled.stats.execution["eager_forwards"] == 0
