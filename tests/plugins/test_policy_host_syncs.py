"""The decoding policies and the proposal step run without host synchronisations, and the baseline's
`dare_block_min_forwards` bound spares the loop its per-step "block finished?" read without changing
a token. The vectorised rules are checked against the per-row loops they replaced (kept below as
references) on random inputs, ties and -inf included."""

from __future__ import annotations

import functools
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from dare_pipeline_plugins.baseline import BaselineDecoding
from dare_pipeline_plugins.factor_decoding import FactorDecoding, factor_counts
from dare_pipeline_plugins.threshold_decoding import ThresholdDecoding, ThresholdOptions

import dare_pipeline.core.loop
from dare_pipeline import Pipeline
from dare_pipeline.core import (
    Proposal,
    hookimpl,
    linear_counts,
    linear_min_forwards,
    propose,
    timestep_count,
    timestep_min_forwards,
    top_k_mask,
)
from dare_pipeline.core.loop import StepBudgetExceeded
from dare_pipeline.execution.host_sync import count_host_syncs
from dare_pipeline.plugin_kit.testing import random_prompts, tiny_model

torch.set_num_threads(1)

GEN = {"gen_length": 32, "block_length": 8, "steps": 16}
POLICIES = {  # name: (generation overrides, plugins)
    "baseline_linear": ({"schedule": "linear"}, []),
    "baseline_timesteps": ({"schedule": "timesteps"}, []),
    "threshold": ({}, [{"name": "threshold_decoding", "threshold": 0.5, "quota": "off"}]),
    "threshold_quota": ({}, [{"name": "threshold_decoding", "threshold": 0.5, "quota": "on"}]),
    "factor": ({}, ["factor_decoding"]),
}
POLICY_CLASS = {"baseline": BaselineDecoding, "threshold": ThresholdDecoding, "factor": FactorDecoding}


@pytest.fixture(autouse=True)
def _countable(monkeypatch):
    # the counter's dispatch mode sees no operator on inference tensors (torch 2.13), and
    # Pipeline.generate decodes under inference_mode: decode under no_grad so every sync is counted
    monkeypatch.setattr(torch, "inference_mode", torch.no_grad)


def _prompts():
    return random_prompts(2, 60, seed=4, exclude=(62, 63))  # two lengths: the batch is padded


def _count_calls(monkeypatch, owner, name, tally: Counter):
    """Replace owner.name by a wrapper adding the host syncs of each call to `tally` ("calls" counts calls)."""
    original = getattr(owner, name)

    @functools.wraps(original)  # keeps the hookimpl marker, so pluggy registers the wrapper
    def counted(*args, **kwargs):
        with count_host_syncs() as counter:
            out = original(*args, **kwargs)
        tally.update(counter.counts)
        tally["calls"] += 1
        return out

    monkeypatch.setattr(owner, name, counted)


def _syncs(tally: Counter) -> dict:
    return {k: v for k, v in tally.items() if k != "calls"}


# ---- no sync in a step's decision or proposal ----------------------------------------------------
@pytest.mark.parametrize("cache", [None, "dual_cache"])
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_and_proposal_are_free_of_host_syncs(monkeypatch, policy, family, cache):
    overrides, plugins = POLICIES[policy]
    policy_class = POLICY_CLASS[policy.split("_")[0]]
    selects, proposes = Counter(), Counter()
    _count_calls(monkeypatch, policy_class, "dare_select_commits", selects)
    _count_calls(monkeypatch, dare_pipeline.core.loop, "propose", proposes)
    pipe = Pipeline(tiny_model(family, seed=3), {"generation": {**GEN, **overrides},
                                                 "plugins": [cache, *plugins] if cache else plugins})
    out = pipe.generate(_prompts())
    assert selects["calls"] > 0 and proposes["calls"] == out.stats.nfe
    assert _syncs(selects) == {} and _syncs(proposes) == {}


def test_the_harness_counts_a_policy_that_reads_the_device(monkeypatch):
    # guards the test above: a sync inside the policy must show up through the wrapper
    original = BaselineDecoding.dare_select_commits

    @functools.wraps(original)
    def reading(self, state, proposal):
        int(proposal.candidates.sum())
        return original(self, state, proposal)

    monkeypatch.setattr(BaselineDecoding, "dare_select_commits", reading)
    tally = Counter()
    _count_calls(monkeypatch, BaselineDecoding, "dare_select_commits", tally)
    out = Pipeline(tiny_model("llada", seed=3), {"generation": GEN}).generate([[1, 2, 3]])
    assert tally["item"] == tally["calls"] == out.stats.nfe


@pytest.mark.parametrize("temperature, remasking", [(0.7, "low_confidence"), (0.0, "random")])
def test_sampling_reads_which_rows_draw_once_per_proposal(temperature, remasking):
    # the one documented sync: rows without a candidate draw no random numbers
    logits = torch.randn(2, 5, 16, dtype=torch.float64)
    candidates = torch.tensor([[True, False, True, True, False], [False] * 5])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    with count_host_syncs() as counter:
        propose(logits, torch.zeros(2, 5, dtype=torch.long), candidates, slice(0, 5), family="llada",
                temperature=temperature, remasking=remasking, confidence="probability", generators=gens)
    assert dict(counter.counts) == {"tolist": 1}


# ---- the baseline's bound -------------------------------------------------------------------------
def _mask_proposing_model(family, seed):
    """A tiny model whose mask-token logit is a random direction: it proposes the mask at some
    columns, so some blocks run past their planned steps."""
    model = tiny_model(family, seed=seed)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight[cfg.mask_token_id] = 5.0 * torch.randn(cfg.d_model, generator=gen) / cfg.d_model ** 0.5
    return model


@hookimpl
def _no_bound(self, state):
    return None


def _decode(model, gen, plugins, prompts):
    try:
        out = Pipeline(model, {"generation": gen, "plugins": plugins}).generate(prompts)
    except StepBudgetExceeded as error:
        return str(error)
    return out.sequences, out.unmask_step, out.stats.tokens_per_step, out.stats.nfe


MODELS = {"plain": lambda family: tiny_model(family, seed=3),
          # seeds whose blocks run past their planned steps (llada: timesteps, dream: linear)
          "mask_proposing": lambda family: _mask_proposing_model(family, {"llada": 2, "dream": 3}[family])}


@pytest.mark.parametrize("steps", [16, 48])  # 4 or 12 steps for a block of 8
@pytest.mark.parametrize("cache", [None, "prefix_cache", "dual_cache"])
@pytest.mark.parametrize("schedule", ["linear", "timesteps"])
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("model", MODELS)
def test_bound_changes_no_token_no_commit_and_no_forward(monkeypatch, model, family, schedule, cache, steps):
    # Dream with a cache commits each block's head without the policy; a bound that is not a true
    # lower bound would run a forward with nothing to commit (a 0 in tokens_per_step, one more NFE)
    net = MODELS[model](family)
    gen = {**GEN, "schedule": schedule, "steps": steps}
    plugins = [cache] if cache else []
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    bounded = _decode(net, gen, plugins, prompts)
    monkeypatch.setattr(BaselineDecoding, "dare_block_min_forwards", _no_bound)
    assert bounded == _decode(net, gen, plugins, prompts)


@pytest.mark.parametrize("cache", ["prefix_cache", "dual_cache"])
@pytest.mark.parametrize("schedule", ["linear", "timesteps"])
def test_bound_counts_the_block_head_commit(monkeypatch, schedule, cache):
    # blocks of one column: Dream's head commit finishes each block at its first forward, while the
    # schedule alone (timesteps: nothing before the last step) would need all the block's steps
    gen = {"gen_length": 4, "block_length": 1, "steps": 12, "schedule": schedule}
    bounded = _decode(tiny_model("dream", seed=3), gen, [cache], [[1, 2, 3]])
    assert bounded[3] == 4
    monkeypatch.setattr(BaselineDecoding, "dare_block_min_forwards", _no_bound)
    assert bounded == _decode(tiny_model("dream", seed=3), gen, [cache], [[1, 2, 3]])


@pytest.mark.parametrize("family, schedule", [("llada", "linear"), ("dream", "timesteps"), ("dream", "linear")])
def test_bound_leaves_about_two_host_reads_per_block(monkeypatch, family, schedule):
    pipe = Pipeline(tiny_model(family, seed=3), {"generation": {**GEN, "schedule": schedule}})
    prompts = _prompts()
    pipe.generate(prompts)  # the timestep bound is cached per block size: warm it
    with count_host_syncs() as bounded:
        out = pipe.generate(prompts)
    monkeypatch.setattr(BaselineDecoding, "dare_block_min_forwards", _no_bound)
    with count_host_syncs() as unbounded:
        pipe = Pipeline(tiny_model(family, seed=3), {"generation": {**GEN, "schedule": schedule}})
        pipe.generate(prompts)
    blocks = GEN["gen_length"] // GEN["block_length"]
    # without a bound the loop reads "finished?" before every forward and once at each block's end
    others = unbounded.total - (out.stats.nfe + blocks)
    assert bounded.total == others + 2 * blocks  # the bound's read and one "finished? yes" a block
    assert out.stats.nfe == GEN["steps"]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("eps", [1e-3, 0.1, 0.5])
def test_timestep_bound_is_a_lower_bound_of_every_trajectory(steps, eps):
    # a step commits at most its count (fewer when the model proposes the mask); step 0 may commit
    # exactly the block head instead; past the last planned step the schedule commits everything
    rng = random.Random(steps * 1000 + int(eps * 1000))

    def forwards(n, head, shortfall):
        left, step = n, 0
        while left:
            count = int(timestep_count(torch.tensor([left]), step, steps, eps))
            if head and step == 0:
                count = 1
            elif shortfall and rng.random() < 0.3:
                count = rng.randint(0, count)
            left, step = left - count, step + 1
        return step

    for n in range(41):
        bound = timestep_min_forwards(n, steps, eps)
        ideal = min(forwards(n, False, False), forwards(n, True, False))
        assert bound == ideal  # tight for the better of the two ideal trajectories
        for _ in range(20):
            assert forwards(n, rng.random() < 0.5, True) >= bound


@pytest.mark.parametrize("steps", [1, 3, 4, 8])
def test_linear_bound_is_the_number_of_nonzero_counts(steps):
    for n in range(30):
        assert linear_min_forwards(n, steps) == int((linear_counts(torch.tensor([n]), steps) > 0).sum())


# ---- vectorised rules = the per-row loops they replaced ------------------------------------------
def _old_top_k_mask(confidence, counts):
    mask = torch.zeros_like(confidence, dtype=torch.bool)
    for b in range(confidence.shape[0]):
        k = int(counts[b])
        if k > 0:
            mask[b, torch.topk(confidence[b], k).indices] = True
    return mask & torch.isfinite(confidence)


def _old_timestep_count(masked, step, steps, eps):
    if step >= steps - 1:
        return masked.clone()
    t = torch.linspace(1, eps, steps + 1)
    frac = 1 - t[step + 1] / t[step]
    return torch.stack([torch.tensor(int(n * frac)) for n in masked.float().cpu()]).to(masked.device)


def _old_factor_count(sorted_conf, factor):
    n = sorted_conf.numel()
    need = torch.tensor([1 - factor / (r + 1) for r in range(1, n + 1)], dtype=sorted_conf.dtype)
    fails = (sorted_conf.cpu() < need).nonzero().squeeze(1).tolist()
    first = next((i + 1 for i in fails if i > 0), None)
    if first is None or first == n:
        return n
    return first - 1


def _random_confidence(gen, rows, cols, ties: bool):
    conf = torch.randint(0, 4, (rows, cols), generator=gen).double() / 4 if ties else \
        torch.rand(rows, cols, generator=gen, dtype=torch.float64)
    return conf.masked_fill(torch.rand(rows, cols, generator=gen) < 0.3, -torch.inf)


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_mask_matches_the_per_row_topk(ties):
    gen = torch.Generator().manual_seed(11)
    for _ in range(200):
        conf = _random_confidence(gen, 4, 9, ties)
        counts = torch.randint(0, 10, (4,), generator=gen)
        new, old = top_k_mask(conf, counts), _old_top_k_mask(conf, counts)
        for b in range(4):  # same count and the same confidences chosen; ties go to the leftmost column
            assert sorted(conf[b][new[b]].tolist()) == sorted(conf[b][old[b]].tolist())
            finite = [j for j in sorted(range(9), key=lambda j: (-conf[b, j].item(), j)) if conf[b, j] > -torch.inf]
            assert new[b].nonzero().squeeze(1).tolist() == sorted(finite[: int(counts[b])])
        if not ties:
            assert torch.equal(new, old)


def test_timestep_count_matches_the_host_loop():
    masked = torch.arange(0, 1025)
    for steps in (1, 2, 3, 7, 32, 128):
        for eps in (1e-3, 1e-2, 0.3):
            for step in sorted({0, 1, steps // 2, steps - 2, steps - 1} & set(range(steps))) if steps > 7 else range(steps):
                assert torch.equal(timestep_count(masked, step, steps, eps), _old_timestep_count(masked, step, steps, eps))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factor_counts_match_the_host_rule(dtype):
    gen = torch.Generator().manual_seed(5)
    for factor in (0.1, 0.5, 1.0, 2.0, 4.0):
        for _ in range(100):
            c = int(torch.randint(1, 12, (1,), generator=gen))
            n = torch.randint(0, c + 1, (3,), generator=gen)
            # probabilities near the thresholds, some tied; entries past a row's n are -inf
            conf = (0.5 + 0.5 * torch.rand(3, c, generator=gen, dtype=torch.float64)).to(dtype)
            conf[0, : c // 2] = conf[0, 0]
            conf = conf.sort(-1, descending=True).values
            conf = conf.masked_fill(torch.arange(c) >= n[:, None], -torch.inf)
            expected = [_old_factor_count(conf[b, : int(n[b])], factor) if n[b] else 0 for b in range(3)]
            assert factor_counts(conf, n, factor).tolist() == expected


def _old_factor_select(proposal, factor):
    cand = proposal.candidates
    score = torch.where(cand, proposal.probability, torch.full_like(proposal.probability, -torch.inf))
    committed = torch.zeros_like(cand)
    for b in range(cand.shape[0]):
        n = int(cand[b].sum())
        if n:
            conf, idx = torch.topk(score[b], n)
            committed[b, idx[: _old_factor_count(conf, factor)]] = True
    return committed


def _random_proposal(gen, rows, cols, dtype=torch.float64, candidates=None):
    if candidates is None:
        cand = torch.rand(rows, cols, generator=gen) < 0.6
        cand[0] = False  # a row with nothing left
    else:
        cand = candidates
    prob = (0.4 + 0.6 * torch.rand(rows, cols, generator=gen, dtype=torch.float64)).to(dtype)
    conf = torch.where(cand, torch.rand(rows, cols, generator=gen, dtype=torch.float64), -torch.inf)
    return Proposal(columns=slice(0, cols), tokens=torch.zeros(rows, cols, dtype=torch.long), confidence=conf,
                    candidates=cand, probability=prob)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factor_policy_matches_the_per_row_loop(dtype):
    gen = torch.Generator().manual_seed(6)
    for factor in (0.5, 1.0, 3.0):
        plugin = FactorDecoding(SimpleNamespace(factor=factor))
        for _ in range(50):
            proposal = _random_proposal(gen, 4, 10, dtype)
            assert torch.equal(plugin.dare_select_commits(None, proposal), _old_factor_select(proposal, factor))


class _OldQuota:
    """The per-row quota rule this module's plugin replaced (lists and int() reads)."""

    def __init__(self, masked, steps, thr):
        self.base, self.left, self.planned, self.thr = [m // steps for m in masked], [0] * len(masked), \
            [steps] * len(masked), thr

    def select(self, i, proposal):
        committed = torch.zeros_like(proposal.candidates)
        for b in range(len(self.base)):
            n = int(proposal.candidates[b].sum())
            if n == 0:
                continue
            last = i >= self.planned[b] - 1
            quota = n if last else min(n, self.base[b] + self.left[b])
            self.left[b] = 0
            _, idx = torch.topk(proposal.confidence[b], quota)
            committed[b, idx[0]] = True
            if quota > 1:
                keep = proposal.probability[b, idx[1:]] >= self.thr
                committed[b, idx[1:][keep]] = True
                self.left[b] = int((~keep).sum())
                if last and self.left[b]:
                    self.planned[b], self.base[b] = i + 2, 0
        return committed


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_quota_mode_matches_the_per_row_loop(threshold):
    gen = torch.Generator().manual_seed(int(threshold * 100))
    rows, cols, steps = 4, 24, 4
    for _ in range(20):
        plugin = ThresholdDecoding(ThresholdOptions(threshold=threshold, quota="on"))
        plugin.dare_generation_start(None)
        plugin.dare_block_start(None)
        candidates = torch.ones(rows, cols, dtype=torch.bool)
        candidates[1, :4] = False  # rows start with different masked counts (base 6, 5, ...)
        candidates[2, :20] = False  # base 1
        old = _OldQuota(candidates.sum(-1).tolist(), steps, threshold)
        for i in range(12):
            if not candidates.any():
                break
            state = SimpleNamespace(step_in_block=i, steps_per_block=steps, batch=rows, family="dream", num_blocks=1)
            proposal = _random_proposal(gen, rows, cols, candidates=candidates)
            new = plugin.dare_select_commits(state, proposal)
            assert torch.equal(new, old.select(i, proposal)), f"step {i}"
            assert plugin._left.tolist() == old.left and plugin._planned.tolist() == old.planned
            assert plugin._base.tolist() == old.base
            candidates = candidates & ~new


def test_threshold_policy_matches_boolean_indexing():
    gen = torch.Generator().manual_seed(9)
    plugin = ThresholdDecoding(ThresholdOptions(threshold=0.7, quota="off"))
    plugin.dare_generation_start(None)
    plugin.dare_block_start(None)
    state = SimpleNamespace(step_in_block=0, family="llada", num_blocks=2)
    for _ in range(50):
        proposal = _random_proposal(gen, 4, 10)
        expected = proposal.candidates & (proposal.probability >= 0.7)
        best, has = proposal.confidence.argmax(-1), proposal.candidates.any(-1)
        expected[has, best[has]] = True
        assert torch.equal(plugin.dare_select_commits(state, proposal), expected)
