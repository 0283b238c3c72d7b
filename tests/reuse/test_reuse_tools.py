"""What the core hands reuse plugins: LayerCall's fields, the default plan's refresh, store.write_v,
and the building blocks in dare_pipeline.reuse (QueryDrift, ShadowLog)."""

from __future__ import annotations

import attrs
import pytest
import torch

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.core.registry import registered
from dare_pipeline.plugin_kit.testing import tiny_model
from dare_pipeline.reuse import ATTN_OUT, FFN_OUT, LayerCall, LayerReuse, QueryDrift, ReuseSet, ShadowLog

torch.set_num_threads(1)


class Recorder(LayerReuse):
    """Owns layer_rows (a fixed per-element choice) and kv_rows (all); records what each call saw."""

    decisions = frozenset({"layer_rows", "kv_rows"})
    fields = frozenset({ATTN_OUT, FFN_OUT})

    def __init__(self, run=None):
        self.run, self.seen = run, []

    def layer_rows(self, call, x):
        return self.run

    def kv_rows(self, call, q):
        self.seen.append((call.layer, call.active.clone(), None if call.run is None else call.run.clone(),
                          call.h.shape, call.rope[0].shape, call.key_mask, call.refresh, call.step))


def test_layer_call_carries_rows_mask_norms_rope_and_key_mask():
    model = tiny_model("llada", seed=1)
    tokens = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10).expand(2, 10)
    store = model.new_store(2, 10)
    for f in (ATTN_OUT, FFN_OUT):
        store.track(f)
    model.forward_rows(tokens, slice(0, 10), positions, None, store, ReuseSet([]))
    run = torch.zeros(2, 10, dtype=torch.bool)
    run[0, [1, 4]] = True
    run[1, [4, 7]] = True
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    rec = Recorder(run)
    model.forward_rows(tokens, slice(0, 10), positions, key_mask, store, ReuseSet([rec]), refresh=False, step=3)
    assert len(rec.seen) == model.config.n_layers
    _layer, active, run_sub, h_shape, rope_shape, mask, refresh, step = rec.seen[0]
    assert active.tolist() == [1, 4, 7]  # union over the batch, absolute columns
    assert run_sub.tolist() == [[True, True, False], [False, True, True]]  # each element's own choice
    assert h_shape == (2, 3, model.config.d_model)
    assert rope_shape == (2, 1, 10, model.config.head_dim)  # the fed rows' cos/sin
    assert mask is key_mask and refresh is False and step == 3


class RefreshSpy(Plugin):
    name = "refresh_spy"

    @hookimpl
    def dare_generation_start(self, state):
        self.refresh = []

    @hookimpl
    def dare_step_end(self, state, committed):
        self.refresh.append((state.step_in_block - 1, state.plan.refresh))


def test_without_a_row_feeder_only_the_block_start_is_a_refresh():
    with registered(RefreshSpy):
        pipe = Pipeline(tiny_model("llada", seed=0), Recipe.from_dict(
            {"generation": {"gen_length": 8, "block_length": 4, "steps": 8}, "plugins": ["refresh_spy"]}))
        pipe.generate([[1, 2, 3]])
    spy = pipe.plugins[-1]
    assert spy.refresh == [(0, True), (1, False), (2, False), (3, False)] * 2


def test_write_v_replaces_values_only_where_keys_and_values_exist():
    model = tiny_model("llada", seed=0)
    store = model.new_store(2, 6)
    hd, heads = model.config.head_dim, model.config.n_kv_heads
    k = torch.randn(2, heads, 4, hd)
    v = torch.randn(2, heads, 4, hd)
    store.write_kv(0, slice(0, 4), k, v)
    new_v = torch.randn(2, heads, 2, hd)
    mask = torch.tensor([[True, False], [True, True]])
    store.write_v(0, slice(2, 4), new_v, mask)
    assert torch.equal(store.keys(0)[:, :, :4], k)  # keys untouched
    assert torch.equal(store.values(0)[0, :, 2], new_v[0, :, 0])
    assert torch.equal(store.values(0)[0, :, 3], v[0, :, 3])  # masked out: kept
    assert torch.equal(store.values(0)[1, :, 2:4], new_v[1])
    with pytest.raises(ValueError, match="hold no keys/values yet"):
        store.write_v(0, slice(3, 5), new_v)  # column 4 was never written


@attrs.frozen
class _Opts:
    threshold: float = 0.5
    exempt_layers: tuple = ()
    refresh_every: int = 0


def _drift_call(model, store, tokens, step, refresh, run=None):
    n = tokens.shape[1]
    return LayerCall(layer=1, module=model.layers[1], store=store, fed=slice(0, n), tokens=tokens, refresh=refresh,
                     step=step, active=torch.arange(n), run=run)


def test_query_drift_mandatory_recomputes_and_threshold():
    model = tiny_model("llada", seed=0)
    store = model.new_store(1, 6)
    heads, hd = model.config.n_heads, model.config.head_dim
    real = torch.ones(1, 6, dtype=torch.bool)
    drift = QueryDrift("t", _Opts(threshold=0.5), model.config.n_layers, real)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    q = torch.randn(1, heads, 6, hd)
    entry = torch.ones(1, 6, dtype=torch.bool)
    assert drift.decide(_drift_call(model, store, tokens, 0, True), q, entry) is None  # refresh: everything
    q2 = q.clone()
    q2[:, :, 1] *= 1.2  # drift 0.2: reused
    q2[:, :, 2] *= 2.0  # drift 1.0: recomputed
    tokens2 = tokens.clone()
    tokens2[0, 3] = 9  # token changed: recomputed whatever its query
    entry2 = entry.clone()
    entry2[0, 4] = False  # no cache entry: recomputed
    mask = drift.decide(_drift_call(model, store, tokens2, 1, False), q2, entry2)
    assert mask.tolist() == [[False, False, True, True, True, False]]
    # recomputed rows got their new reference; reused rows kept the old one
    ref = store.read("t.q_ref", 1, slice(0, 6)).view(1, 6, heads, hd).transpose(1, 2)
    assert torch.equal(ref[:, :, 2], q2[:, :, 2]) and torch.equal(ref[:, :, 1], q[:, :, 1])
    assert store.read("t.token", 1, slice(0, 6))[0, :, 0].tolist() == [1, 2, 3, 9, 5, 6]
    report = drift.report("kv")
    assert report["recompute_reasons"] == {"refresh": 6, "exempt": 0, "no_entry": 1, "token_changed": 1, "block": 0,
                                            "drift": 1}
    assert report["per_layer"][1] == {"layer": 1, "eligible": 12, "reused": 3, "reuse_fraction": 0.25,
                                      "recomputed": {"q": 12, "kv": 9}}


def test_query_drift_zero_threshold_reuses_nothing_and_padding_is_not_counted():
    model = tiny_model("llada", seed=0)
    store = model.new_store(1, 4)
    real = torch.tensor([[False, True, True, True]])
    drift = QueryDrift("t", _Opts(threshold=0.0), model.config.n_layers, real)
    tokens = torch.tensor([[7, 1, 2, 3]])
    q = torch.randn(1, model.config.n_heads, 4, model.config.head_dim)
    entry = torch.ones(1, 4, dtype=torch.bool)
    drift.decide(_drift_call(model, store, tokens, 0, True), q, entry)
    assert drift.decide(_drift_call(model, store, tokens, 1, False), q, entry) is None  # drift 0 is not < 0
    assert drift.report("kv")["rows_eligible"] == 6  # 3 real rows x 2 forwards


def test_query_drift_refresh_every_and_exempt_layers():
    model = tiny_model("llada", seed=0, n_layers=3)
    store = model.new_store(1, 3)
    drift = QueryDrift("t", _Opts(threshold=10.0, exempt_layers=(2,), refresh_every=2), 3, torch.ones(1, 3, dtype=bool))
    tokens = torch.tensor([[1, 2, 3]])
    q = torch.randn(1, model.config.n_heads, 3, model.config.head_dim)
    entry = torch.ones(1, 3, dtype=torch.bool)
    answers = []
    for step in range(5):
        row = []
        for layer in range(3):
            call = _drift_call(model, store, tokens, step, refresh=step == 0)
            call.layer = layer
            row.append(drift.decide(call, q, entry) is None)
        answers.append(row)
    # forwards 0, 2, 4 recompute everything (refresh, then every 2); layer 2 always
    assert answers == [[True] * 3, [False, False, True], [True] * 3, [False, False, True], [True] * 3]
    with pytest.raises(ValueError, match="exempt_layers = \\[5\\]: the model has 3 layers"):
        QueryDrift("t", _Opts(exempt_layers=(5,)), 3, torch.ones(1, 3, dtype=bool))


def test_shadow_log_reports_relative_errors_per_layer_and_step():
    log = ShadowLog(n_layers=2)
    exact = torch.ones(1, 2, 4)
    reused = exact.clone()
    reused[0, 0] *= 1.5  # row 0 off by 50%; row 1 exact but not reused (weight 0)
    log.record(0, 1, reused, exact, torch.tensor([[1.0, 0.0]]))
    log.record(1, 1, exact, exact, torch.tensor([[1.0, 1.0]]))
    report = log.report()
    assert report["per_layer"][0]["records"] == 0 and report["per_layer"][0]["mean_rel_error"] is None
    assert report["per_layer"][1]["max_rel_error"] == pytest.approx(0.5)
    assert report["per_layer"][1]["mean_rel_error"] == pytest.approx(0.25)
    assert [(s["step"], s["rows"]) for s in report["per_step"]] == [(0, 1), (1, 2)]
