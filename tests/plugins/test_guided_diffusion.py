"""Guided diffusion: the rule at its two ends (a guide that never agrees decodes as the fall-back
policy, one that always agrees commits a block per forward), with test doubles and with real tiny
transformers models; the guide's cache against uncached forwards; counted guide work against what
ran; the early stop; the threshold union; options and recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dare_pipeline_plugins import guided_diffusion as gd
from guided_helpers import FakeGuide, save_guide

from dare_pipeline import Pipeline, Recipe, load_model
from dare_pipeline.config import ConfigError
from dare_pipeline.core import Plugin, hookimpl, registered
from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score
from dare_pipeline.plugin_kit.testing import random_prompts, tiny_model

torch.set_num_threads(1)

ROOT = Path(__file__).parents[2]
GEN = {"gen_length": 16, "block_length": 8, "steps": 16}
NAME = "guided_diffusion"
HELDOUT = read_jsonl(HELDOUT_FILE)
PROBLEMS = HELDOUT[:4]  # one per family (the file interleaves them)


class LeftToRight(Plugin):
    """The reference fall-back as a policy of its own: the first masked column of each row."""

    name = "left_to_right"
    provides = frozenset({"commit_policy"})

    @hookimpl
    def dare_select_commits(self, state, proposal):
        masked = proposal.candidates
        index = torch.arange(masked.shape[-1])
        first = torch.where(masked, index, masked.shape[-1]).amin(-1, keepdim=True)
        return index == first


def _run(model, plugins, prompts, **gen):
    pipe = Pipeline(model, Recipe.from_dict({"generation": {**GEN, **gen}, "plugins": plugins}))
    return pipe.generate(prompts), pipe


def _same(a, b):
    assert a.sequences == b.sequences
    assert a.unmask_step == b.unmask_step


@pytest.fixture
def fake_guide(monkeypatch):
    """fake_guide(mode) makes every guided pipeline load a FakeGuide of that mode."""
    made = []

    def install(mode):
        def load(options, model):
            made.append(FakeGuide(mode, model.config.vocab_size, token=model.config.mask_token_id))
            return made[-1]

        monkeypatch.setattr(gd, "load_guide", load)
        return made

    return install


# ---- the two ends of the rule, test doubles ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_double_that_never_agrees_decodes_as_the_fallback(family, fake_guide):
    made = fake_guide("never")
    model = tiny_model(family, seed=3)
    prompts = random_prompts(3, 62, seed=5)
    with registered(LeftToRight):
        want, _ = _run(model, ["left_to_right"], prompts)
    got, _ = _run(model, [{"name": NAME, "stop_at_eos": False}], prompts)
    _same(got, want)
    stats = got.stats.plugins[NAME]
    assert stats["accepted"] == 0 and stats["fallbacks"] == 3 * GEN["gen_length"]  # one token a row and forward
    assert stats["fallback_rate"] == 1.0 and len(made[-1].calls) == got.stats.nfe
    # the `confident` fall-back is the baseline's one most confident token per step
    want, _ = _run(model, [], prompts)
    got, _ = _run(model, [{"name": NAME, "stop_at_eos": False, "fallback": "confident"}], prompts)
    _same(got, want)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_double_that_always_agrees_commits_each_block_in_one_forward(family, fake_guide):
    made = fake_guide("agree")
    model = tiny_model(family, seed=3)
    prompts = random_prompts(3, 62, seed=5)
    want, _ = _run(model, [{"name": "threshold_decoding", "threshold": 0.0, "quota": "off"}], prompts)
    blocks = GEN["gen_length"] // GEN["block_length"]
    for window, per_block in ((32, 1), (3, 3)):  # chained windows: ceil(8 / 3) guide forwards a block
        got, _ = _run(model, [{"name": NAME, "stop_at_eos": False, "verify_window": window}], prompts)
        _same(got, want)
        assert got.stats.nfe == blocks
        stats = got.stats.plugins[NAME]
        assert stats["accepted"] == 3 * GEN["gen_length"] and stats["fallbacks"] == 0
        assert stats["guide_forwards"] == blocks * per_block == len(made[-1].calls)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_never_agreeing_with_the_threshold_union_is_threshold_decoding(family, fake_guide):
    fake_guide("never")
    model = tiny_model(family, seed=4, sharpness=1.5)
    prompts = random_prompts(3, 62, seed=6)
    want, _ = _run(model, [{"name": "threshold_decoding", "threshold": 0.3, "quota": "off"}], prompts)
    got, _ = _run(model, [{"name": NAME, "stop_at_eos": False, "fallback": "confident", "also_commit_above": 0.3}],
                  prompts)
    _same(got, want)
    assert got.stats.plugins[NAME]["threshold_commits"] > 0


# ---- the two ends with real transformers models (uniform logits: every token ties) -----------------------
@pytest.fixture(scope="module")
def embedded():
    return {"llada": load_model("default"), "dream": load_model("default-dream")}


@pytest.fixture(scope="module")
def uniform_guides(tmp_path_factory):
    root = tmp_path_factory.mktemp("guides")
    return {"llada": save_guide(root / "llama", "llama", uniform=True),
            "dream": save_guide(root / "qwen2", "qwen2", uniform=True)}


def _prompts(n=3):
    return [p["prompt"] for p in HELDOUT[:n]]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_real_guide_that_never_agrees_decodes_as_the_fallback(family, embedded, uniform_guides):
    model, guide = embedded[family], str(uniform_guides[family])
    with registered(LeftToRight):
        want, _ = _run(model, ["left_to_right"], _prompts())
    # uniform logits give every token 1/101 < 0.5
    got, _ = _run(model, [{"name": NAME, "guide": guide, "accept": "min_prob", "min_prob": 0.5,
                           "stop_at_eos": False}], _prompts())
    _same(got, want)
    assert got.stats.plugins[NAME]["accepted"] == 0 and got.stats.plugins[NAME]["guide_forwards"] == got.stats.nfe


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_real_guide_that_always_agrees_commits_each_block_in_one_forward(family, embedded, uniform_guides):
    model, guide = embedded[family], str(uniform_guides[family])
    want, _ = _run(model, [{"name": "threshold_decoding", "threshold": 0.0, "quota": "off"}], _prompts())
    got, _ = _run(model, [{"name": NAME, "guide": guide, "stop_at_eos": False}], _prompts())
    _same(got, want)
    assert got.stats.nfe == GEN["gen_length"] // GEN["block_length"]
    assert got.stats.plugins[NAME]["accepted"] == 3 * GEN["gen_length"]


# ---- the guide's cache and its counted work ----------------------------------------------------------------
def test_cached_guide_logits_equal_uncached_forwards(monkeypatch, embedded):
    """Every check reads the logits a forward over the whole prefix (no cache) gives, in a padded
    batch, across blocks, chained windows and crops."""
    original = gd.GuidedDiffusion._guide_logits
    checked = []

    def compare(self, state, proposal, start, stop):
        logits = original(self, state, proposal, start, stop)
        tokens = state.x[:, :stop - 1].clone()
        block = proposal.columns
        tokens[:, block.start:stop - 1] = proposal.tokens[:, :stop - 1 - block.start]
        full = self._guide.model(input_ids=tokens, attention_mask=state.attention_mask[:, :stop - 1].long(),
                                 position_ids=state.positions[:, :stop - 1]).logits[:, start - 1:stop - 1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        checked.append(stop - start)
        return logits

    monkeypatch.setattr(gd.GuidedDiffusion, "_guide_logits", compare)
    prompts = [p["prompt"] for p in HELDOUT[4:7]]
    out, _ = _run(embedded["llada"], [{"name": NAME, "verify_window": 5}], prompts, gen_length=64, block_length=16,
                  steps=64)
    assert len(checked) > out.stats.nfe  # chained windows were checked too


def test_counted_guide_work_is_what_ran(embedded, monkeypatch):
    """Forwards, fed rows and FLOPs as reported: the matrix products torch's FLOP counter sees in
    each guide forward, and the attention kernel's scores and weighted values from its shapes (the
    counter does not count the CPU attention kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = Pipeline(embedded["llada"], {"generation": {"gen_length": 64, "block_length": 32, "steps": 64},
                                        "plugins": [{"name": NAME, "verify_window": 12}]})
    pipe.generate(_prompts(1))  # loads the guide
    # the counter's dispatch mode sees no operator on inference tensors: decode under no_grad
    monkeypatch.setattr(torch, "inference_mode", torch.no_grad)
    guide = next(p for p in pipe.plugins if p.name == NAME)._guide
    original, seen = guide.forward, {"forwards": 0, "rows": 0, "flops": 0}

    def counted(tokens, *args):
        seen["inside"] = True
        with FlopCounterMode(display=False) as counter:
            logits = original(tokens, *args)
        seen["inside"] = False
        seen["forwards"] += 1
        seen["rows"] += tokens.numel()
        # less the rotary frequencies' outer product (a matmul in transformers 4: positions x
        # frequencies, not the model's matrix work)
        rotary = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("rotary_emb"))
        seen["flops"] += counter.get_total_flops() - rotary
        return logits

    attention = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, *args, **kwargs):  # (B, heads, Lq, head_dim) x (B, kv heads, Lk, head_dim)
        seen["flops"] += seen.get("inside", False) * 4 * query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] * query.shape[3]
        return attention(query, key, *args, **kwargs)

    guide.forward = counted
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    out = pipe.generate(_prompts(3))
    stats = out.stats.plugins[NAME]
    assert stats["guide_forwards"] == seen["forwards"] > out.stats.nfe  # windows of 12 in blocks of 32
    assert stats["guide_rows"] == seen["rows"]
    assert stats["guide_flops"] == seen["flops"] == out.stats.extra_flops["guide"]
    assert stats["guide_execution"] == "eager"


# ---- the embedded pair ------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["guided.yaml", "guided_dual_cache.yaml", "guided_dual_cache_threshold.yaml"])
def test_the_embedded_pair_answers_with_few_forwards(recipe, embedded):
    pipe = Pipeline(embedded["llada"], Recipe.from_yaml(ROOT / "recipes" / recipe))
    out = pipe.generate([p["prompt"] for p in PROBLEMS], gen_length=64, steps=64)
    assert [score(p, t)["exact_match"] for p, t in zip(PROBLEMS, out.text)] == [True] * 4, out.text
    assert out.stats.nfe <= 4  # a batch of 4 at gen_length 64: two blocks, the answer in the first
    stats = out.stats.plugins[NAME]
    assert stats["guide"] == "default" and stats["accepted_per_forward_mean"] > 8


def test_the_early_stop_ends_answers_at_their_eos(embedded):
    prompts = [p["prompt"] for p in PROBLEMS]
    gen = {"gen_length": 128, "block_length": 32, "steps": 128}
    stop, _ = _run(embedded["llada"], [NAME], prompts, **gen)
    slow, _ = _run(embedded["llada"], [{"name": NAME, "stop_at_eos": False}], prompts, **gen)
    assert stop.text == slow.text
    assert stop.stats.nfe < gen["gen_length"] // gen["block_length"] <= slow.stats.nfe
    eos = embedded["llada"].config.eos_token_id
    for row, steps, per_step in zip(stop.answers, stop.unmask_step, stop.stats.tokens_per_step):
        assert sum(per_step) == gen["gen_length"] and 0 not in steps
        assert all(s <= stop.stats.nfe for s in steps)
    filled = stop.stats.plugins[NAME]["eos_filled"]
    assert filled > 0 and all(t == eos for seq in stop.sequences for t in seq[-32:])


# ---- options and recipes ------------------------------------------------------------------------------------
def test_recipes_load_and_take_overrides():
    recipe = Recipe.from_yaml(ROOT / "recipes" / "guided_dual_cache.yaml",
                              overrides=["plugins.guided_diffusion.accept=top_k_relative",
                                         "plugins.guided_diffusion.also_commit_above=0.95",
                                         "plugins.guided_diffusion.verify_window=8"])
    options = recipe.plugins[1].options
    assert (options.accept, options.also_commit_above, options.verify_window, options.top_k) == \
        ("top_k_relative", 0.95, 8, 2)
    assert recipe.plugins[0].options.head_commit == "off"
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(("option", "message"), [
    ({"accept": "vote"}, "accept = 'vote': allowed values: ['argmax', 'top_k_relative', 'min_prob']"),
    ({"verify_window": 0}, "verify_window = 0: must be >= 1"),
    ({"also_commit_above": 1.5}, "also_commit_above = 1.5: must be between 0.0 and 1.0"),
    ({"guide": "/no/such/guide"}, "guide = '/no/such/guide': not a directory"),
    ({"guide": str(ROOT / "recipes")}, "no config.json in"),
    ({"dtype": "float8"}, "dtype = 'float8': allowed values"),
    ({"device": "gpu"}, "device = 'gpu': not a torch device"),
])
def test_bad_options_name_the_key(option, message):
    with pytest.raises(ConfigError, match=r"plugins\[0\]") as info:
        Recipe.from_dict({"plugins": [{"name": NAME, **option}]}, source="r.yaml")
    assert message in str(info.value) and str(info.value).startswith("r.yaml: ")


def test_threshold_decoding_beside_it_is_refused():
    with pytest.raises(ConfigError, match="'guided_diffusion' and 'threshold_decoding' both decide 'commit_policy'"):
        Recipe.from_dict({"plugins": [NAME, "threshold_decoding"]})


def test_accept_rules_on_known_logits():
    plugin = gd.GuidedDiffusion(gd.GuidedOptions())
    probs = torch.tensor([[[0.5, 0.3, 0.15, 0.05], [0.4, 0.4, 0.1, 0.1]]])
    logits = probs.log()
    drafts = torch.tensor([[1, 1]])
    assert plugin._accepts(logits, drafts).tolist() == [[False, True]]  # a tie with the top agrees
    plugin.options = gd.GuidedOptions(accept="top_k_relative", top_k=2, relative=0.5)
    assert plugin._accepts(logits, drafts).tolist() == [[True, True]]
    plugin.options = gd.GuidedOptions(accept="top_k_relative", top_k=2, relative=0.7)
    assert plugin._accepts(logits, drafts).tolist() == [[False, True]]  # 0.3 < 0.7 * 0.5
    plugin.options = gd.GuidedOptions(accept="min_prob", min_prob=0.35)
    assert plugin._accepts(logits, drafts).tolist() == [[False, True]]
    assert plugin._accepts(logits, torch.tensor([[7, 1]])).tolist() == [[False, True]]  # beyond the guide's logits
