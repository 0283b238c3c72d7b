"""The proposal's sampling filters (core/sampling.py): top_p and top_k rule out the tokens Dream's
reference rules rule out, sampling never draws a ruled-out token and draws the others in proportion,
and each family ranks by its reference's distribution (Dream: the sampled one, tempered and
filtered; LLaDA: the model's own softmax)."""

from __future__ import annotations

import pytest
import torch

from dare_pipeline.core.sampling import outside_nucleus, propose


def _kept_by_the_rules(logits: torch.Tensor, top_p: float, top_k: int) -> set[int]:
    """The reference rules, token by token: walk the tokens from the most likely and keep each until
    the cumulative probability has passed top_p; then keep those of the survivors whose logit is at
    least the k-th largest of the survivors."""
    probs = torch.softmax(logits.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda t: (-logits[t].item(), t))
    kept, total = [], 0.0
    for token in order:
        if top_p < 1 and total > top_p:
            break
        kept.append(token)
        total += probs[token]
    if top_k > 0:
        values = sorted((logits[t].item() for t in kept), reverse=True)
        kth = values[min(top_k, len(values)) - 1]
        kept = [t for t in kept if logits[t].item() >= kth]
    return set(kept)


@pytest.mark.parametrize("top_p, top_k", [(0.0, 0), (0.3, 0), (0.9, 0), (0.999, 0), (1.0, 3), (1.0, 1),
                                          (0.9, 2), (0.5, 50), (1.0, 0)])
def test_outside_nucleus_rules_out_what_the_reference_rules_do(top_p, top_k):
    generator = torch.Generator().manual_seed(int(top_p * 1000) + top_k)
    logits = torch.randn(6, 40, generator=generator) * 3
    logits[0, [3, 9, 20]] = logits[0].max() + 1  # a tie at the top: top_p 0 keeps the first (the argmax)
    logits[1, :5] = logits[1, 7]  # ties below
    out = outside_nucleus(logits, top_p, top_k)
    if top_p >= 1 and top_k == 0:
        assert out is None
        return
    for row, ruled_out in zip(logits, out):
        assert set(torch.nonzero(~ruled_out).flatten().tolist()) == _kept_by_the_rules(row, top_p, top_k)


def _propose(logits, family, temperature=0.0, top_p=1.0, top_k=0, seed=0):
    rows, columns = logits.shape[:2]
    generators = [torch.Generator().manual_seed(seed + b) for b in range(rows)]
    return propose(logits, torch.zeros(rows, columns, dtype=torch.long), torch.ones(rows, columns, dtype=torch.bool),
                   slice(0, columns), family=family, temperature=temperature, remasking="low_confidence",
                   confidence="probability", generators=generators, top_p=top_p, top_k=top_k)


def test_greedy_tokens_are_the_argmax_and_dream_ranks_by_the_nucleus():
    logits = torch.randn(3, 8, 30, generator=torch.Generator().manual_seed(1)) * 2
    probs = torch.softmax(logits.double(), -1)
    top = probs.max(-1).values
    for family in ("llada", "dream"):
        plain, nucleus = _propose(logits, family), _propose(logits, family, top_p=0.6)
        assert torch.equal(plain.tokens, logits.argmax(-1)) and torch.equal(nucleus.tokens, plain.tokens)
        torch.testing.assert_close(plain.probability.double(), top, rtol=1e-5, atol=1e-7)
    # LLaDA's reference ranks by the model's softmax whatever top_p is; Dream's by the renormalised nucleus
    torch.testing.assert_close(_propose(logits, "llada", top_p=0.6).probability.double(), top)
    kept = ~outside_nucleus(logits, 0.6)
    in_nucleus = (probs * kept).sum(-1)
    torch.testing.assert_close(_propose(logits, "dream", top_p=0.6).probability.double(), top / in_nucleus,
                               rtol=1e-5, atol=1e-7)


def test_dream_ranks_by_the_tempered_distribution_and_llada_by_the_models():
    logits = torch.randn(2, 16, 30, generator=torch.Generator().manual_seed(2)) * 2
    for family, scale in (("dream", 1 / 0.5), ("llada", 1.0)):
        proposal = _propose(logits, family, temperature=0.5)
        probs = torch.softmax(logits.double() * scale, -1)
        want = torch.gather(probs, -1, proposal.tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(proposal.probability.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sampling_draws_only_kept_tokens_in_proportion(family):
    """Logits [2, 1, 0, -1] at temperature 1 (probabilities 0.644, 0.237, 0.087, 0.032): top_k 2 keeps
    the first two, drawn 73.1 % / 26.9 % (e^2 : e^1); top_p 0.8 keeps the same two (the cumulative
    0.881 passes 0.8 at the second token, which stays)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(64, 250, 4).contiguous()
    for filters in ({"top_k": 2}, {"top_p": 0.8}):
        tokens = _propose(logits, family, temperature=1.0, seed=7, **filters).tokens
        counts = torch.bincount(tokens.flatten(), minlength=4).double() / tokens.numel()
        assert counts[2:].sum() == 0, counts
        assert abs(counts[0].item() - 0.7311) < 0.01, counts
    unfiltered = _propose(logits, family, temperature=1.0, seed=7).tokens
    assert torch.bincount(unfiltered.flatten(), minlength=4)[2:].sum() > 0  # the filters did rule them out


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_top_p_reads_the_tempered_distribution(family):
    """At temperature 2 the logits [2, 1, 0, -1] are [1, 0.5, 0, -0.5] (probabilities 0.455, 0.276,
    0.167, 0.102): top_p 0.8 keeps three tokens (0.731 has not passed it), drawn in proportion
    e^1 : e^0.5 : e^0 (50.7 %, 30.7 %, 18.6 %); on the untempered logits it would keep two."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(64, 250, 4).contiguous()
    tokens = _propose(logits, family, temperature=2.0, top_p=0.8, seed=3).tokens
    counts = torch.bincount(tokens.flatten(), minlength=4).double() / tokens.numel()
    assert counts[3] == 0 and abs(counts[0].item() - 0.5066) < 0.01 and abs(counts[2].item() - 0.1863) < 0.01, counts


def test_bf16_logits_are_tempered_and_ranked_in_float32():
    logits = torch.randn(2, 8, 30, generator=torch.Generator().manual_seed(4)) * 3
    half = logits.to(torch.bfloat16)
    proposal = _propose(half, "dream", temperature=0.3)
    want = torch.softmax(half.float() / 0.3, -1).gather(-1, proposal.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(proposal.probability, want, rtol=1e-6, atol=1e-7)


def test_sampling_survives_logits_whose_exp_underflows_or_overflows():
    """exp(-800) is 0 and exp(800) inf in float64: the sampler draws from the kept tokens all the same."""
    for shift in (-800.0, 800.0):
        logits = (torch.tensor([2.0, 1.0, 0.0, -1.0]) + shift).expand(8, 100, 4).contiguous()
        logits[..., 0] = -torch.inf if shift < 0 else logits[..., 0]
        tokens = _propose(logits, "llada", temperature=1.0, top_k=2, seed=5).tokens
        kept = {1, 2} if shift < 0 else {0, 1}
        assert set(tokens.flatten().tolist()) == kept, (shift, torch.bincount(tokens.flatten()))


def test_a_seed_per_prompt_samples_each_prompt_as_it_would_alone_with_its_seed():
    """generate(seeds=[...]): one seed per prompt in one batch, each prompt's tokens those it samples
    alone with its seed (the server batches sampled rows of different seeds this way)."""
    from dare_pipeline import Pipeline, load_model

    pipe = Pipeline(load_model("default"))
    prompt, short = "Q: reverse pythonwizard\nA: ", {"gen_length": 32, "steps": 32, "temperature": 2.0}
    both = pipe.generate([prompt, prompt], seeds=[1, 2], **short)
    alone = [pipe.generate([prompt], seed=s, **short).sequences[0] for s in (1, 2)]
    assert both.sequences == alone and alone[0] != alone[1]
    with pytest.raises(ValueError, match=r"seeds = \[1\]: expected 2 whole number\(s\), one per prompt"):
        pipe.generate([prompt, prompt], seeds=[1], **short)
    with pytest.raises(ValueError, match="expected 1 whole number"):
        pipe.generate([prompt], seeds=[True], **short)
    with pytest.raises(TypeError, match="seeds = 7: expected a list of one seed"):
        pipe.generate([prompt], seeds=7, **short)
