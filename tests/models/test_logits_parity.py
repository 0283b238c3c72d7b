"""Our LLaDA and Dream implementations reproduce the reference modeling code's float32 logits."""

import pytest
import torch
from safetensors.torch import load_file

from dare_pipeline.reuse import ReuseSet

TOL = 1e-3  # the references' own fp32-vs-fp64 gap is ~4e-4 on these sharp tiny models


@pytest.fixture(scope="module", params=["llada", "dream"])
def case(request, golden_models, golden_dir):
    fam = request.param
    return fam, golden_models[fam], load_file(golden_dir / f"{fam}_logits.safetensors")


@pytest.mark.parametrize("which", ["a", "b"])
def test_full_forward_matches_reference(case, which):
    _, model, ref = case
    logits = model(ref[f"input_{which}_ids"])
    assert logits.shape == ref[f"logits_{which}"].shape
    assert (logits - ref[f"logits_{which}"]).abs().max().item() < TOL


def _store_from(model, ids):
    """A store filled by a full forward of `ids` (what a cache refresh does)."""
    store = model.new_store(1, ids.shape[1])
    positions = torch.arange(ids.shape[1])[None]
    model.forward_rows(ids, slice(0, ids.shape[1]), positions, None, store, ReuseSet([]))
    return store, positions


def test_prefix_cache_step_matches_reference(case):
    """Prefix K/V from input a, the rest of input b fed with its absolute positions."""
    _, model, ref = case
    a, b = ref["input_a_ids"], ref["input_b_ids"]
    prompt_len, length = 16, a.shape[1]
    store, positions = _store_from(model, a)
    fed = slice(prompt_len, length)
    logits = model.forward_rows(b[:, fed], fed, positions, None, store, ReuseSet([]))
    assert (logits - ref["prefix_cache_logits_b"]).abs().max().item() < TOL


def test_dual_cache_step_matches_reference(case):
    """All K/V from input a; only the block [P, P+16) of input b fed, its K/V replaced in place."""
    _, model, ref = case
    a, b = ref["input_a_ids"], ref["input_b_ids"]
    store, positions = _store_from(model, a)
    fed = slice(16, 32)
    logits = model.forward_rows(b[:, fed], fed, positions, None, store, ReuseSet([]))
    assert (logits - ref["dual_cache_logits_b"]).abs().max().item() < TOL


def test_forward_rows_without_store_equals_forward(case):
    _, model, ref = case
    ids = ref["input_b_ids"]
    positions = torch.arange(ids.shape[1])[None]
    rows = model.forward_rows(ids, slice(0, ids.shape[1]), positions, None, None, ReuseSet([]))
    assert torch.equal(rows, model(ids))


def test_padding_is_masked_out(case):
    """A left-padded row gives the logits of the same tokens unpadded."""
    _, model, ref = case
    ids = ref["input_b_ids"]
    pad = torch.full((1, 5), 3, dtype=torch.long)
    padded = torch.cat([pad, ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)], 1)
    both = model(torch.cat([padded, torch.cat([ids, ids[:, :5]], 1)]),
                 attention_mask=torch.cat([mask, torch.ones_like(mask)]))
    assert (both[0, 5:] - model(ids)[0]).abs().max().item() < TOL  # attending to padding moves logits by O(1)
