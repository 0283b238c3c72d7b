"""Turning logits into a proposal: a token per candidate position and a confidence to rank it by."""

from __future__ import annotations

import attrs
import torch

# Confidence precision of each family's reference decoder: LLaDA ranks by float64 softmax, Dream by
# float32. Ranking in the other precision can reorder candidates whose confidences tie at 1e-8.
CONFIDENCE_DTYPE = {"llada": torch.float64, "dream": torch.float32}
# Which distribution each family's reference ranks by: Dream by the one it samples from (tempered,
# then filtered by top_p and top_k), LLaDA (and a family not named here) by the model's own softmax.
RANKS_SAMPLED_DISTRIBUTION = {"dream"}
CONFIDENCES = ("probability", "margin", "neg_entropy")


@attrs.define
class Proposal:
    """What the model proposes for the candidate columns of this step (all tensors (B, c))."""

    columns: slice  # absolute canvas columns the tensors cover (the current block, or the whole answer)
    tokens: torch.Tensor  # proposed token per column (the current token where not masked)
    confidence: torch.Tensor  # ranking score; -inf where the column is not a candidate
    candidates: torch.Tensor  # bool: masked and eligible this step
    probability: torch.Tensor  # softmax probability of the proposed token (threshold rules read this)


def row_uniform(shape, generators: list[torch.Generator], device, active: list[bool] | None = None) -> torch.Tensor:
    """float64 uniforms of `shape` (B, ...), row b drawn from generators[b]: a prompt's random
    numbers depend on its own seed, never on the other prompts of the batch. Rows not `active`
    (nothing to decide: the prompt only waits for the others of its batch) draw nothing and get
    0.5, so a prompt's stream advances exactly as it would decoded alone."""
    active = [True] * len(generators) if active is None else active
    return torch.stack([torch.rand(shape[1:], dtype=torch.float64, device=device, generator=g) if on
                        else torch.full(shape[1:], 0.5, dtype=torch.float64, device=device)
                        for g, on in zip(generators, active)])


def gumbel_argmax(logits: torch.Tensor, temperature: float, generators: list[torch.Generator],
                  active: list[bool] | None = None) -> torch.Tensor:
    """Sample with the Gumbel-max trick in float64 (exp(l) / (-log u)^T, then argmax); argmax when T == 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.to(torch.float64)
    # less each row's largest logit (clamped: a row of -inf stays -inf): the same argmax, and exp can
    # neither overflow nor flush every token a filter kept to 0
    logits = logits - logits.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).min)
    u = row_uniform(logits.shape, generators, logits.device, active)
    return (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)


def filters_apply(family: str, temperature: float, top_p: float, top_k: int) -> bool:
    """Whether top_p / top_k can change a proposal: they are on, and either tokens are sampled or the
    family ranks by the filtered distribution (at temperature 0 a LLaDA-family model takes the
    argmax, which every filter keeps, and ranks by the unfiltered softmax)."""
    return (top_p < 1 or top_k > 0) and (temperature > 0 or family in RANKS_SAMPLED_DISTRIBUTION)


def outside_nucleus(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor | None:
    """Bool (..., V): the tokens that top_p, then top_k, rule out of the distribution softmax(`logits`)
    (None when both are off), by Dream's reference rules. top_p keeps the most likely tokens up to
    and including the first whose cumulative probability passes top_p (so always the most likely
    one; top_p 0 keeps that one alone); top_k then keeps the tokens whose logit is at least the k-th
    largest (ties at the k-th all stay). Fixed-shape device ops: no host synchronisation."""
    out = None
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True, stable=True)  # ties: the argmax first
        passed = torch.softmax(ordered.float(), dim=-1).cumsum(-1) > top_p
        drop = torch.zeros_like(passed)
        drop[..., 1:] = passed[..., :-1]  # the token that passes top_p stays
        out = torch.zeros_like(drop).scatter_(-1, order, drop)
        logits = logits.masked_fill(out, -torch.inf)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        below = logits < kth
        out = below if out is None else out | below
    return out


def propose(logits: torch.Tensor, canvas: torch.Tensor, candidates: torch.Tensor, columns: slice, *,
            family: str, temperature: float, remasking: str, confidence: str,
            generators: list[torch.Generator], top_p: float = 1.0, top_k: int = 0) -> Proposal:
    """Proposal for `columns` from their logits (B, c, V); `canvas` (B, c) holds the current tokens.

    Tokens come from softmax(logits / temperature) restricted by top_p and top_k (argmax at
    temperature 0). The confidence and `probability` read the distribution the family's reference
    ranks by (RANKS_SAMPLED_DISTRIBUTION): Dream's the sampled one, LLaDA's the unfiltered softmax.

    Greedy decoding (temperature 0, confidence remasking) runs on the device without a host
    synchronisation. Sampling (temperature > 0 or random remasking) has exactly one: which rows
    still have a candidate is read on the host, because a row without one must draw no random
    numbers (its generator's stream then stays that of the prompt decoded alone), and whether a
    generator advances is decided on the host."""
    # the one sync of sampling (see the docstring)
    active = candidates.any(-1).tolist() if temperature > 0 or remasking == "random" else None
    dtype = CONFIDENCE_DTYPE.get(family, torch.float32)
    sampled = logits
    if filters_apply(family, temperature, top_p, top_k):
        # tempered in float32 at least: a bf16 division would round the distribution it filters
        ruled_out = outside_nucleus(logits.float() / temperature if temperature > 0 else logits, top_p, top_k)
        sampled = logits.masked_fill(ruled_out, -torch.inf)
    # the Gumbel sampler tempers in float64 itself
    tokens = gumbel_argmax(sampled, temperature, generators, active)
    ranked = logits.to(dtype)
    if family in RANKS_SAMPLED_DISTRIBUTION:
        ranked = sampled.to(dtype) / temperature if temperature > 0 else sampled.to(dtype)
    probs = torch.softmax(ranked, dim=-1)
    prob = torch.gather(probs, -1, tokens[..., None]).squeeze(-1)
    if remasking == "random":
        score = row_uniform(tokens.shape, generators, tokens.device, active)
    elif confidence == "probability":
        score = prob
    elif confidence == "margin":
        top2 = probs.topk(2, dim=-1).values
        score = top2[..., 0] - top2[..., 1]
    elif confidence == "neg_entropy":
        score = (probs * torch.log(probs + 1e-10)).sum(-1)
    else:
        raise ValueError(f"unknown confidence {confidence!r}; known: {CONFIDENCES}")
    tokens = torch.where(candidates, tokens, canvas)
    score = torch.where(candidates, score, torch.full_like(score, -torch.inf))
    return Proposal(columns=columns, tokens=tokens, confidence=score, candidates=candidates, probability=prob)


def descending_rank(score: torch.Tensor) -> torch.Tensor:
    """Long (B, c): each column's 0-based rank in its row by `score`, highest first, ties by column
    (a stable sort): fixed-shape device ops only, so ranking never waits on the host."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def top_k_mask(confidence: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool (B, c): the counts[b] highest-confidence columns of each row (never a -inf column).

    Ranked on the device (`descending_rank`) and compared with the (B,) counts, with no per-row
    read of a count on the host; equal confidences go to the leftmost column."""
    return (descending_rank(confidence) < counts[:, None]) & torch.isfinite(confidence)
