"""Fast-dLLM's factor rule for parallel decoding (Fast-dLLM commit cb3a7570,
`get_transfer_index_dynamic`).

Sort the candidates' probabilities descending, c_1 >= c_2 >= ... >= c_n. Rank r (1-based) passes
when c_r >= 1 - factor / (r + 1); rank 1 always passes. Scanning r = 2, 3, ...: at the first failing
rank r the r - 1 most confident candidates are committed; when no rank fails all n are. The
reference has a quirk kept here for parity: when the first failing rank is the last one (r = n), all
n are committed too. Ranking and test both use the probability of the proposed token (LLaDA:
float64 softmax), not generation.confidence. The loop runs each block until it has no masked column.
All rows are decided at once on the device (a stable descending sort, the rule tested rank by rank,
the first failing rank found by a min), with no host synchronisation.

Options:
  factor  the f of the rule (1.0 in the paper); larger commits more per step
"""

from __future__ import annotations

import attrs
import torch

from dare_pipeline.config import at_least
from dare_pipeline.core import Plugin, hookimpl


@attrs.frozen(kw_only=True)
class FactorOptions:
    factor: float = attrs.field(default=1.0, validator=at_least(0.0, strict=True))


def factor_counts(sorted_conf: torch.Tensor, n: torch.Tensor, factor: float) -> torch.Tensor:
    """How many candidates the rule commits in each row, on the device: (B,) from `sorted_conf` (B, c)
    (each row's probabilities sorted descending, its n[b] candidates first) and `n` (B,).

    need_r = 1 - factor / (r + 1) is computed in float64 like Python's float, then rounded to the
    probabilities' dtype, as the reference compares; ranks past a row's n are not tested."""
    c = sorted_conf.shape[-1]
    rank = torch.arange(1, c + 1, device=sorted_conf.device)
    need = (1 - factor / (rank + 1).to(torch.float64)).to(sorted_conf.dtype)
    fails = (sorted_conf < need) & (rank >= 2) & (rank <= n[:, None])  # rank 1 always passes
    first = torch.where(fails, rank, c + 1).amin(-1)  # first failing rank; c + 1 when none fails
    return torch.where(first >= n, n, first - 1)  # none fails, or the last rank fails: all n


def factor_count(sorted_conf: torch.Tensor, factor: float) -> int:
    """`factor_counts` of one row whose entries are all candidates (a 1-d tensor); reads the result."""
    n = torch.tensor([sorted_conf.numel()], device=sorted_conf.device)
    return int(factor_counts(sorted_conf[None], n, factor)[0])


class FactorDecoding(Plugin):
    """Fast-dLLM's factor rule: commit the most confident candidates while rank r has c_r >= 1 - f/(r+1)."""

    name = "factor_decoding"
    Options = FactorOptions
    provides = frozenset({"commit_policy"})

    @hookimpl
    def dare_select_commits(self, state, proposal):
        # every row at once: sort the candidates by probability (stable: ties go to the leftmost
        # column), count, and scatter "sorted position < count" back to the columns; no host read
        cand = proposal.candidates
        score = torch.where(cand, proposal.probability, torch.full_like(proposal.probability, -torch.inf))
        order = score.argsort(dim=-1, descending=True, stable=True)
        k = factor_counts(score.gather(-1, order), cand.sum(-1), self.options.factor)
        take = torch.arange(cand.shape[-1], device=cand.device) < k[:, None]
        return cand & torch.zeros_like(cand).scatter_(-1, order, take)
