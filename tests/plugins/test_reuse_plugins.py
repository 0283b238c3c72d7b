"""The reuse plugins (dare_kv, dare_o, dllm_cache): mandatory recomputes, real reuse, exempt layers,
stats, shadow mode, recipes and refused compositions. Exactness at zero threshold and batch
invariance are properties in test_reuse_property.py; dLLM-Cache's reference parity is in
tests/parity/test_dllmcache_parity.py; every plugin also passes tests/plugins/test_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.core import ForwardPlan, Plugin, hookimpl
from dare_pipeline.core.registry import available_plugins, registered
from dare_pipeline.plugin_kit.testing import random_prompts, tiny_model
from dare_pipeline.reuse import QueryDrift

torch.set_num_threads(1)

RECIPES = Path(__file__).parents[2] / "recipes"
GEN = {"gen_length": 16, "block_length": 8, "steps": 16}
DARE = ["dare_kv", "dare_o"]


def _run(model, plugins, prompts, **gen):
    return Pipeline(model, Recipe.from_dict({"generation": {**GEN, **gen}, "plugins": plugins})).generate(prompts)


def _still_model(seed=0, family="llada"):
    """A model whose queries barely move with the context: attention adds almost nothing to the
    residual stream, so each row's layer inputs are nearly its own embedding."""
    model = tiny_model(family, seed=seed, n_layers=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.o_proj.weight.mul_(1e-3)
    return model


# ---- mandatory recomputes --------------------------------------------------------------------------
@pytest.mark.parametrize("at_refresh", [False, True])
@pytest.mark.parametrize("name", DARE)
def test_changed_tokens_missing_entries_and_refreshes_are_always_recomputed(name, at_refresh, monkeypatch):
    """With a threshold no drift reaches, a row is recomputed exactly when it must be: its token changed
    since the previous forward, or the forward is the generation's first; with `recompute_at_refresh`
    also every block's first forward (a refresh). Without it a refresh recomputes only changed rows."""
    calls = []
    decide = QueryDrift.decide

    def spy(self, call, q, entry):
        mask = decide(self, call, q, entry)
        calls.append((call.step, call.layer, call.refresh, call.active.clone(),
                      call.tokens[:, call.active - call.fed.start].clone(),
                      torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if mask is None else mask.clone()))
        return mask

    monkeypatch.setattr(QueryDrift, "decide", spy)
    model = tiny_model("llada", seed=4, n_layers=3)
    _run(model, [{"name": name, "threshold": 1e9, "exempt_layers": [], "recompute_at_refresh": at_refresh,
                  "recompute_block": False}], [[5, 6, 7]])
    previous = {}
    checked = refreshes_reusing = 0
    for step, layer, refresh, active, tokens, recompute in calls:
        if step == 0 or (refresh and at_refresh):
            assert bool(recompute.all())
        else:
            changed = tokens != previous[layer]
            assert torch.equal(recompute, changed), (step, layer)  # changed rows, and only they
            checked += int(changed.sum())
            refreshes_reusing += int(refresh and not bool(recompute.all()))
        previous[layer] = tokens
    assert checked > 0
    assert (refreshes_reusing > 0) != at_refresh  # the second block's refresh reuses unless told not to


@pytest.mark.parametrize("name", DARE)
def test_rows_are_reused_when_queries_barely_move(name):
    out = _run(_still_model(), [{"name": name, "threshold": 0.05, "recompute_block": False}],
               random_prompts(2, 62, seed=1))
    report = out.stats.plugins[name]
    assert report["reuse_fraction"] > 0.5
    assert report["recompute_reasons"]["token_changed"] > 0
    # the core computed fewer rows of the skipped sub-operation than it fed
    sub = 1 if name == "dare_kv" else 2
    assert int(out.stats.layer_rows[:, sub].sum()) < int(out.stats.layer_rows[:, 0].sum())
    assert report["rows_eligible"] - report["rows_reused"] == sum(
        layer["recomputed"]["kv" if name == "dare_kv" else "attn"] for layer in report["per_layer"])


@pytest.mark.parametrize("name", DARE)
def test_rows_of_the_block_being_decoded_always_recompute_with_recompute_block(name, monkeypatch):
    seen = []
    decide = QueryDrift.decide

    def spy(self, call, q, entry):
        mask = decide(self, call, q, entry)
        if mask is not None:
            seen.append((self.block[call.active].clone(), mask.clone()))
        return mask

    monkeypatch.setattr(QueryDrift, "decide", spy)
    out = _run(_still_model(), [{"name": name, "threshold": 0.5, "recompute_block": True}], random_prompts(2, 62, seed=1))
    assert seen and all(bool(mask[:, block].all()) for block, mask in seen)  # every block row recomputes
    assert any(bool((~mask[:, ~block]).any()) for block, mask in seen)  # the others may be reused
    report = out.stats.plugins[name]
    assert report["recompute_reasons"]["block"] > 0 and report["rows_reused"] > 0
    assert available_plugins()["dare_o"].Options().recompute_block is True
    assert available_plugins()["dare_kv"].Options().recompute_block is False


@pytest.mark.parametrize("name", DARE)
def test_exempt_layers_always_recompute(name):
    out = _run(_still_model(), [{"name": name, "threshold": 0.5, "exempt_layers": [1]}], [[1, 2, 3, 4]])
    layers = out.stats.plugins[name]["per_layer"]
    assert layers[1]["reused"] == 0 and layers[1]["recomputed"]["q"] == layers[1]["eligible"] > 0
    assert layers[2]["reused"] > 0
    assert out.stats.plugins[name]["recompute_reasons"]["exempt"] > 0


def test_dare_o_exempts_layer_0_by_default_and_dare_kv_does_not():
    plugins = available_plugins()
    assert plugins["dare_o"].Options().exempt_layers == (0,)
    assert plugins["dare_kv"].Options().exempt_layers == ()


def test_refresh_every_and_recompute_at_refresh_force_full_recomputes():
    model = _still_model()
    base = _run(model, [{"name": "dare_kv", "threshold": 0.5}], [[1, 2, 3]])
    at_refresh = _run(model, [{"name": "dare_kv", "threshold": 0.5, "recompute_at_refresh": True}], [[1, 2, 3]])
    forced = _run(model, [{"name": "dare_kv", "threshold": 0.5, "refresh_every": 2}], [[1, 2, 3]])
    rows = 3 * (3 + GEN["gen_length"])  # layers x real rows of one full forward
    assert base.stats.plugins["dare_kv"]["recompute_reasons"]["refresh"] == rows  # the first forward only
    assert at_refresh.stats.plugins["dare_kv"]["recompute_reasons"]["refresh"] == 2 * rows  # the two block starts
    assert forced.stats.plugins["dare_kv"]["recompute_reasons"]["refresh"] == 8 * rows  # every other forward


def test_exempt_layers_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="exempt_layers = \\[7\\]: the model has 3 layers"):
        _run(_still_model(), [{"name": "dare_kv", "exempt_layers": [7]}], [[1, 2]])
    with pytest.raises(ConfigError, match="layer indices must be >= 0"):
        Recipe.from_dict({"plugins": [{"name": "dare_o", "exempt_layers": [-1]}]})


# ---- stats -----------------------------------------------------------------------------------------
DARE_KEYS = {"threshold", "row_budget", "rows_eligible", "rows_reused", "reuse_fraction", "reused_over_budget", "per_layer",
             "recompute_reasons"}
DLLM_KEYS = {"refresh_counts", "rows_eligible", "rows_reused", "reuse_fraction", "per_layer", "min_verify_margin",
             "verify_margins"}


@pytest.mark.parametrize("name, keys, sub_ops", [
    ("dare_kv", DARE_KEYS, {"q", "kv"}), ("dare_o", DARE_KEYS, {"q", "attn"}), ("ffn_reuse", DARE_KEYS, {"q", "ffn"}),
    ("dllm_cache", DLLM_KEYS, {"q", "kv", "attn", "ffn", "v_verify"}),
])
def test_stats_keys(name, keys, sub_ops):
    out = _run(tiny_model("llada", seed=2), [name], [[1, 2, 3]])
    report = out.stats.plugins[name]
    assert set(report) == keys
    assert len(report["per_layer"]) == 2
    for layer in report["per_layer"]:
        assert set(layer) == {"layer", "eligible", "reused", "reuse_fraction", "recomputed"}
        assert set(layer["recomputed"]) == sub_ops
    assert report["rows_eligible"] == sum(layer["eligible"] for layer in report["per_layer"])
    assert 0.0 <= report["reuse_fraction"] <= 1.0


@pytest.mark.parametrize("name", ["dare_kv", "dare_o", "ffn_reuse", "dllm_cache"])
def test_padding_is_never_counted(name):
    prompts = [[1, 2], [3, 4, 5, 6, 7]]  # the first prompt is left-padded by 3 columns
    out = _run(tiny_model("llada", seed=3), [name], prompts)
    real = sum(len(p) for p in prompts) + 2 * GEN["gen_length"]
    for layer in out.stats.plugins[name]["per_layer"]:
        assert layer["eligible"] == real * out.stats.nfe  # every forward feeds every real row


def test_dllm_cache_step_kinds_and_verify_rows():
    model = tiny_model("llada", seed=1, n_layers=3)
    out = _run(model, [{"name": "dllm_cache", "prompt_interval": 5, "response_interval": 3, "ratio": 0.25}],
               [[1, 2, 3]])
    report = out.stats.plugins["dllm_cache"]
    # 16 forwards, s = 1..16: full at s=1, response refresh at s-1 in {3,6,9,12,15} unless also prompt (15),
    # prompt at s-1 in {5,10}
    assert report["refresh_counts"] == {"full": 2, "response": 4, "prompt": 2, "none": 8}
    layer0, layer1 = report["per_layer"][0], report["per_layer"][1]
    assert layer0["reused"] == 0 and layer0["recomputed"]["v_verify"] == 0  # layer 0 always recomputes
    assert layer1["recomputed"]["v_verify"] == (2 + 8) * GEN["gen_length"]  # every non-response-refresh step
    assert len(report["verify_margins"]) == 10 and report["min_verify_margin"] >= 0
    exact = _run(model, [{"name": "dllm_cache", "prompt_interval": 1, "response_interval": 1}], [[1, 2, 3]])
    assert exact.stats.plugins["dllm_cache"]["refresh_counts"]["full"] == exact.stats.nfe
    assert exact.stats.plugins["dllm_cache"]["rows_reused"] == 0


class PartialFeeder(Plugin):
    """An undeclared row feeder: feeds only the current block after the block start."""

    name = "partial_feeder"
    provides = frozenset({"row_feed"})

    @hookimpl
    def dare_generation_start(self, state):
        state.require_store()

    @hookimpl
    def dare_plan_forward(self, state):
        if state.step_in_block == 0:
            return ForwardPlan.full(state.length)
        return ForwardPlan(fed=state.block_columns)


def test_dllm_cache_refuses_partial_forwards_at_run_time():
    with registered(PartialFeeder), pytest.raises(RuntimeError, match="dllm_cache needs every canvas column fed"):
        _run(tiny_model("llada"), ["partial_feeder", "dllm_cache"], [[1, 2]])


# ---- shadow mode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", [
    {"name": "dare_kv", "threshold": 0.3}, {"name": "dare_o", "threshold": 0.3},
    {"name": "dllm_cache", "prompt_interval": 4, "response_interval": 3},
])
def test_shadow_mode_reports_errors_without_changing_the_decode(entry):
    model = _still_model(seed=1)
    prompts = random_prompts(2, 62, seed=2)
    plain = _run(model, [entry], prompts)
    shadow = _run(model, [{**entry, "shadow": True}], prompts)
    assert shadow.sequences == plain.sequences and shadow.unmask_step == plain.unmask_step
    report = shadow.stats.plugins[entry["name"]]["shadow"]
    assert report["max_rel_error"] is not None and report["max_rel_error"] >= report["mean_rel_error"] >= 0
    assert sum(layer["records"] for layer in report["per_layer"]) == len(report["per_step"]) > 0
    assert all(s["rows"] > 0 for s in report["per_step"])


def test_dare_kv_shadow_error_is_zero_at_layer_0():
    """Layer-0 keys and values depend only on the token and its position: reusing them is exact."""
    out = _run(tiny_model("llada", seed=6, n_layers=3), [{"name": "dare_kv", "threshold": 0.5, "shadow": True}],
               [[1, 2, 3]])
    layers = out.stats.plugins["dare_kv"]["shadow"]["per_layer"]
    assert layers[0]["records"] > 0 and layers[0]["max_rel_error"] < 1e-6
    assert layers[2]["records"] > 0 and layers[2]["max_rel_error"] > 1e-3


# ---- recipes and composition -----------------------------------------------------------------------
@pytest.mark.parametrize("name, plugins", [
    ("dare_kv", ["dare_kv"]), ("dare_o", ["dare_o"]), ("dllm_cache", ["dllm_cache"]),
    ("dual_cache_threshold_dare_o", ["dual_cache", "threshold_decoding", "dare_o"]),
    ("dual_cache_threshold_dare_kv", ["dual_cache", "threshold_decoding", "dare_kv"]),
])
def test_shipped_recipe_loads_and_runs(name, plugins):
    recipe = Recipe.from_yaml(RECIPES / f"{name}.yaml")
    assert recipe.name == name and [p.name for p in recipe.plugins] == plugins
    small = recipe.with_overrides(["generation.gen_length=16", "generation.block_length=8", "generation.steps=16"])
    out = Pipeline(tiny_model("llada", seed=1), small).generate([[3, 4, 5]])
    assert 0 not in out.unmask_step[0]
    assert plugins[-1] in out.stats.plugins


@pytest.mark.parametrize("pair, reason", [
    (["prefix_cache", "dllm_cache"], "feed only part of the canvas"),
    (["dual_cache", "dllm_cache"], "feed only part of the canvas"),
    (["dllm_cache", "dare_kv"], "already decides per layer which rows recompute"),
    (["dare_o", "dllm_cache"], "already decides per layer which rows recompute"),
])
def test_nonsensical_compositions_are_refused_with_the_reason(pair, reason):
    with pytest.raises(ConfigError, match=f"cannot be combined with .*{reason}"):
        Recipe.from_dict({"plugins": pair})


def test_dare_stacks_with_the_fast_dllm_plugins():
    model = _still_model(seed=2)
    prompts = [[3, 9, 27, 17], [8, 1, 40, 2]]  # no padding: every fed row is eligible
    for plugins in (["dual_cache", "threshold_decoding", "dare_o"], ["prefix_cache", "factor_decoding", "dare_kv"],
                    ["dual_cache", "dare_kv", "dare_o"]):
        out = _run(model, plugins, prompts)
        for name in plugins:
            if name.startswith("dare_"):
                assert out.stats.plugins[name]["rows_reused"] > 0, plugins
        # DARE decides only among the rows the row feeder still feeds
        reports = [out.stats.plugins[n] for n in plugins if n.startswith("dare_")]
        fed = out.stats.rows_fed
        assert all(r["per_layer"][0]["eligible"] == fed for r in reports)
