"""How many tokens a fixed-step policy commits at each step of a block."""

from __future__ import annotations

import functools

import torch


def linear_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: spread each row's masked count evenly over `steps`, remainder first.

    masked: (B,) masked positions per row at block start -> (B, steps) counts summing to masked.
    """
    base = masked // steps
    rem = masked % steps
    counts = base[:, None].repeat(1, steps)
    counts += (torch.arange(steps, device=masked.device)[None, :] < rem[:, None]).long()
    return counts


def timestep_count(masked: torch.Tensor, step: int, steps: int, eps: float) -> torch.Tensor:
    """Dream's schedule: at step i commit int(n * (1 - t[i+1]/t[i])) of the n masked, all at the last step.

    t = linspace(1, eps, steps + 1) in float32 on the counts' device, as the reference computes it, so
    that the integer truncation lands on the same counts; the float32 product is truncated on the
    device (`.long()` truncates towards zero like int(), and both factors are >= 0), so no count is
    read on the host. masked: (B,) -> (B,) counts.
    """
    if step >= steps - 1:
        return masked.clone()
    t = torch.linspace(1, eps, steps + 1, device=masked.device)
    frac = 1 - t[step + 1] / t[step]
    return (masked.float() * frac).long()


def linear_min_forwards(masked: int, steps: int) -> int:
    """Forwards a block of `masked` masked columns needs at least under `linear_counts`: a step
    commits at most its count, so the block cannot finish before its last nonzero count, and the
    nonzero counts (remainder first) are the first min(masked, steps). A block-head commit in place of
    step 0 commits one column, never more than that step's count (>= 1), so the bound holds then too."""
    return min(masked, steps)


@functools.lru_cache(maxsize=64)
def timestep_min_forwards(masked: int, steps: int, eps: float, device: torch.device | str = "cpu") -> int:
    """Forwards a block of `masked` masked columns needs at least under `timestep_count`.

    Simulated once per argument tuple with the schedule's own float32 arithmetic, on the `device`
    its counts are computed on (whose linspace may round differently), for every count 0..masked,
    then read with one host sync. Each step may commit fewer than its count (a proposal equal to the
    mask token stays masked), and a larger count must never finish sooner, so each step's "left
    masked" map m -> m - count(m) is replaced by its monotone lower envelope (the least left by any
    m' >= m; a safeguard, the map is monotone for the schedules tested). Step 0 may instead commit
    exactly one column without asking the schedule (Dream's block-head commit at a cache refresh),
    so it leaves at least min(envelope, m - 1). Commits past the planned steps cannot come sooner."""
    counts = torch.arange(masked + 1, device=device)
    left = counts.clone()
    needed = torch.zeros_like(counts)
    for step in range(steps):
        needed += left > 0
        after = counts - timestep_count(counts, step, steps, eps)
        envelope = after.flip(0).cummin(0).values.flip(0)
        left = envelope[left]
        if step == 0:
            left = torch.minimum(left, (counts - 1).clamp(min=0))
    return int(needed[masked])
