"""benchmarks/dare_stacking.py counts each FLOP once: its GFLOPs are the rows' estimate, not the
estimate's parts and its total summed together."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from dare_pipeline import Pipeline, load_model
from dare_pipeline.reuse import flops

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def dare_stacking(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("dare_stacking")


def test_gflops_are_the_estimate_of_what_ran(dare_stacking):
    model = load_model("default")
    probs = dare_stacking.problems(1)[:2]
    gen = {"gen_length": 32, "block_length": 32, "steps": 32}
    plugins = ["dual_cache", "threshold_decoding"]
    measured = dare_stacking.measure(model, plugins, probs, gen)
    pipe = Pipeline(model, {"generation": gen, "plugins": plugins})
    expected = 0.0
    for p in probs:
        out = pipe.generate([p["prompt"]])
        expected += flops.estimate(model.config, out.stats.layer_rows, len(out.sequences[0]))["total"]
    assert measured["gflops"] == pytest.approx(expected / 1e9)
