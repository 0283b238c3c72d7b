"""How many tokens a fixed-step policy commits at each step of a block."""

from __future__ import annotations

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

    t = linspace(1, eps, steps + 1) in float32, computed exactly as the reference does so that the
    integer truncation lands on the same counts. masked: (B,) -> (B,) counts.
    """
    if step >= steps - 1:
        return masked.clone()
    t = torch.linspace(1, eps, steps + 1)
    frac = 1 - t[step + 1] / t[step]
    return torch.stack([torch.tensor(int(n * frac)) for n in masked.float().cpu()]).to(masked.device)
