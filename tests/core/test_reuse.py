"""The model's layer-level reuse path: skipped rows really come from the store, computed rows are exact."""

import pytest
import torch

from dare_pipeline.core.stats import RowCounter
from dare_pipeline.plugin_kit.testing import tiny_model
from dare_pipeline.reuse import ATTN_OUT, FFN_OUT, LayerReuse, ReuseSet


class RandomSkip(LayerReuse):
    """Skips a random subset of rows, differently per batch element, for the decisions it owns."""

    fields = frozenset({ATTN_OUT, FFN_OUT})

    def __init__(self, decisions, seed=0, keep=0.5):
        self.decisions = frozenset(decisions)
        self.gen = torch.Generator().manual_seed(seed)
        self.keep = keep
        self.calls = 0

    def _mask(self, like):
        self.calls += 1
        return torch.rand(like.shape[:2], generator=self.gen) < self.keep

    def layer_rows(self, call, x):
        return self._mask(x)

    def kv_rows(self, call, q):
        return self._mask(q.transpose(1, 2))

    def attn_rows(self, call, q):
        return self._mask(q.transpose(1, 2))

    def ffn_rows(self, call, x):
        return self._mask(x)


def _forward(model, tokens, store, reuse):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model.forward_rows(tokens, slice(0, tokens.shape[1]), positions, None, store, reuse)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("decisions", [("layer_rows",), ("kv_rows",), ("attn_rows",), ("ffn_rows",),
                                       ("kv_rows", "attn_rows"), ("layer_rows", "attn_rows", "ffn_rows")])
def test_reusing_rows_of_an_identical_input_is_exact(family, decisions):
    model = tiny_model(family, seed=1)
    tokens = torch.randint(0, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    store = model.new_store(2, 20)
    for f in (ATTN_OUT, FFN_OUT):
        store.track(f)
    fresh = _forward(model, tokens, store, ReuseSet([]))
    skipper = RandomSkip(decisions)
    reused = _forward(model, tokens, store, ReuseSet([skipper]))
    assert skipper.calls == model.config.n_layers * len(decisions)
    assert (reused - fresh).abs().max().item() < 1e-5


@pytest.mark.parametrize("decisions", [("layer_rows",), ("kv_rows",), ("attn_rows",), ("ffn_rows",)])
def test_skipped_rows_really_serve_stale_values(decisions):
    model = tiny_model("llada", seed=2)
    gen = torch.Generator().manual_seed(1)
    old = torch.randint(0, 60, (1, 16), generator=gen)
    new = torch.randint(0, 60, (1, 16), generator=gen)
    store = model.new_store(1, 16)
    for f in (ATTN_OUT, FFN_OUT):
        store.track(f)
    _forward(model, old, store, ReuseSet([]))
    stale = _forward(model, new, store, ReuseSet([RandomSkip(decisions, keep=0.0)]))
    exact = _forward(model, new, model.new_store(1, 16), ReuseSet([]))
    assert (stale - exact).abs().max().item() > 1e-2


def test_counters_count_only_recomputed_rows():
    model = tiny_model("llada", seed=3)
    tokens = torch.randint(0, 60, (1, 12))
    store = model.new_store(1, 12)
    store.track(ATTN_OUT)
    _forward(model, tokens, store, ReuseSet([]))
    counters = RowCounter(model.config.n_layers)

    class SkipFirstFour(LayerReuse):
        decisions = frozenset({"kv_rows"})

        def kv_rows(self, call, q):
            mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
            mask[:, :4] = False
            return mask

    positions = torch.arange(12)[None]
    model.forward_rows(tokens, slice(0, 12), positions, None, store, ReuseSet([SkipFirstFour()]), counters=counters)
    totals = counters.totals()
    assert totals[:, 0].tolist() == [12] * model.config.n_layers  # queries: every row
    assert totals[:, 1].tolist() == [8] * model.config.n_layers  # keys/values: 4 rows reused


def test_ffn_rows_counts_only_the_rows_that_ran_the_ffn():
    model = tiny_model("llada", seed=3)
    tokens = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(4))
    store = model.new_store(2, 12)
    store.track(FFN_OUT)
    _forward(model, tokens, store, ReuseSet([]))
    counters = RowCounter(model.config.n_layers)

    class FfnOfTwoColumns(LayerReuse):  # element 0 runs column 3, element 1 column 7: both run for both
        decisions = frozenset({"ffn_rows"})

        def ffn_rows(self, call, x):
            mask = torch.zeros(x.shape[:2], dtype=torch.bool)
            mask[0, 3] = mask[1, 7] = True
            return mask

    positions = torch.arange(12).expand(2, 12)
    entered = []
    handle = model.layers[0].gate_proj.register_forward_hook(lambda m, a, o: entered.append(a[0].shape[:2]))
    try:
        model.forward_rows(tokens, slice(0, 12), positions, None, store, ReuseSet([FfnOfTwoColumns()]),
                           counters=counters)
    finally:
        handle.remove()
    totals = counters.totals()
    assert entered == [torch.Size([2, 2])]  # the union of the two columns, for both elements
    assert totals[:, 3].tolist() == [4] * model.config.n_layers  # FFN rows: 2 columns x batch 2
    assert totals[:, 2].tolist() == [24] * model.config.n_layers  # attention still runs for every row


def test_row_counter_sums_host_and_device_counts_alike(monkeypatch):
    monkeypatch.setattr(RowCounter, "FOLD_EVERY", 3)  # fold while counting, and again when read
    counter = RowCounter(2)
    for step in range(5):
        counter.add(0, (4, torch.tensor(3), 4, torch.tensor(step)))
        counter.add(1, (torch.tensor(2), 1, 0, 5))
    counter.add(1, (0, 0, 0, 0, torch.tensor(7)))  # value-only rows (V-verify): the fifth column
    assert counter.totals().tolist() == [[20, 15, 20, 10, 0], [10, 5, 0, 25, 7]]
    assert counter.totals().tolist() == [[20, 15, 20, 10, 0], [10, 5, 0, 25, 7]]  # reading twice changes nothing


def test_two_owners_of_a_layer_decision_are_refused():
    a, b = RandomSkip(("kv_rows",)), RandomSkip(("kv_rows", "attn_rows"))
    with pytest.raises(ValueError, match="both RandomSkip and RandomSkip decide 'kv_rows'"):
        ReuseSet([a, b])
