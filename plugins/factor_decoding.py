"""Fast-dLLM's factor rule for parallel decoding (methods.md section 2; Fast-dLLM commit cb3a7570,
`get_transfer_index_dynamic`).

Sort the candidates' probabilities descending, c_1 >= c_2 >= ... >= c_n. Rank r (1-based) passes
when c_r >= 1 - factor / (r + 1); rank 1 always passes. Scanning r = 2, 3, ...: at the first failing
rank r the r - 1 most confident candidates are committed; when no rank fails all n are. The
reference has a quirk kept here for parity: when the first failing rank is the last one (r = n), all
n are committed too. Ranking and test both use the probability of the proposed token (LLaDA:
float64 softmax), not generation.confidence. The loop runs each block until it has no masked column.

Options:
  factor  the f of the rule (1.0 in the paper); larger commits more per step
"""

from __future__ import annotations

import attrs
import torch

from dare_pipeline.config_loading import at_least
from dare_pipeline.hookspecs import hookimpl
from dare_pipeline.plugin import Plugin


@attrs.frozen(kw_only=True)
class FactorOptions:
    factor: float = attrs.field(default=1.0, validator=at_least(0.0, strict=True))


def factor_count(sorted_conf: torch.Tensor, factor: float) -> int:
    """How many of the n candidates (probabilities sorted descending, a 1-d tensor) the rule commits."""
    n = sorted_conf.numel()
    need = torch.tensor([1 - factor / (r + 1) for r in range(1, n + 1)], dtype=sorted_conf.dtype)
    fails = (sorted_conf.cpu() < need).nonzero().squeeze(1).tolist()
    first = next((i + 1 for i in fails if i > 0), None)  # 1-based rank; rank 1 always passes
    if first is None or first == n:
        return n
    return first - 1


class FactorDecoding(Plugin):
    name = "factor_decoding"
    Options = FactorOptions
    provides = frozenset({"commit_policy"})

    @hookimpl
    def dare_select_commits(self, state, proposal):
        cand = proposal.candidates
        score = torch.where(cand, proposal.probability, torch.full_like(proposal.probability, -torch.inf))
        committed = torch.zeros_like(cand)
        for b in range(cand.shape[0]):
            n = int(cand[b].sum())
            if n == 0:
                continue
            conf, idx = torch.topk(score[b], n)
            k = factor_count(conf, self.options.factor)
            committed[b, idx[:k]] = True
        return committed
