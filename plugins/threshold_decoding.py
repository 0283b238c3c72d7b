"""Fast-dLLM's confidence-aware parallel decoding: commit every candidate of
the current block whose probability reaches the threshold, and always the most confident one, so
every step makes progress. The loop runs each block until it has no masked column.

The most confident candidate is ranked by the proposal's confidence (generation.confidence /
remasking); the threshold is compared with the probability of the proposed token (LLaDA: float64
softmax, Dream: float32, as their references).

Quota mode (Fast-dLLM Dream `generation_utils.py`, `alg: confidence_threshold`, no cache): the
block's masked count is spread over its planned steps (steps / blocks); a step considers only its
quota (that base plus every rejection carried over from earlier steps) of the most confident
candidates: the first always commits, the others iff they reach the threshold, and each rejection
is carried to the next step. At the planned last step (and after it) the quota is everything still
masked; a rejection there plans one more step with a base quota of 0. The per-row state (base,
carried rejections, planned steps) lives in (B,) device tensors and each step is decided with
fixed-shape device ops, so neither mode synchronises with the host.

Options:
  threshold  probability a candidate needs (0.9 in the paper)
  quota      auto: quota mode for Dream when the whole answer is one block and the block's first
             forward is decided by this policy (the reference's no-cache decoder); on; off
"""

from __future__ import annotations

import attrs
import torch

from dare_pipeline.config import choice, in_range
from dare_pipeline.core import Plugin, descending_rank, hookimpl


@attrs.frozen(kw_only=True)
class ThresholdOptions:
    threshold: float = attrs.field(default=0.9, validator=in_range(0.0, 1.0))
    quota: str = attrs.field(default="auto", validator=choice("auto", "on", "off"))


class ThresholdDecoding(Plugin):
    """Fast-dLLM's parallel decoding: commit every candidate whose probability reaches the threshold."""

    name = "threshold_decoding"
    Options = ThresholdOptions
    provides = frozenset({"commit_policy"})

    @hookimpl
    def dare_generation_start(self, state):
        self._quota_mode = None
        self._base = self._left = self._planned = None

    @hookimpl
    def dare_block_start(self, state):
        self._quota_mode = None  # decided at the block's first policy decision

    def _use_quota(self, state) -> bool:
        mode = self.options.quota
        if mode == "auto":
            return state.family == "dream" and state.num_blocks == 1 and state.step_in_block == 0
        return mode == "on"

    @hookimpl
    def dare_select_commits(self, state, proposal):
        if self._quota_mode is None:
            self._quota_mode = self._use_quota(state)
            if self._quota_mode:
                # per-row quota state, (B,) tensors on the device: nothing is read on the host
                steps = state.steps_per_block
                masked = proposal.candidates.sum(-1)
                self._base = masked // steps
                self._left = torch.zeros_like(masked)
                self._planned = torch.full_like(masked, steps)
        if self._quota_mode:
            return self._select_quota(state, proposal)
        return self._select_threshold(proposal)

    def _select_threshold(self, proposal):
        cand = proposal.candidates
        committed = cand & (proposal.probability >= self.options.threshold)
        return committed | _best_of_rows(proposal.confidence, cand)

    def _select_quota(self, state, proposal):
        """The quota rule of the module docstring for all rows at once: ranks by a stable descending
        sort of the confidence; a row without candidates keeps its state. Rank 0 commits even at a
        quota of 0 (fewer masked columns than steps, which the reference refuses)."""
        i = state.step_in_block
        cand = proposal.candidates
        n = cand.sum(-1)
        has = n > 0
        last = self._planned <= i + 1
        quota = torch.where(last, n, torch.minimum(n, self._base + self._left))
        rank = descending_rank(proposal.confidence)
        considered = cand & (rank < quota[:, None]) & (rank > 0)  # rank 0 always commits
        keep = considered & (proposal.probability >= self.options.threshold)
        rejected = (considered & ~keep).sum(-1)
        self._left = torch.where(has, rejected, self._left)
        replan = has & last & (rejected > 0)  # a rejection at the last step plans one more
        self._planned = torch.where(replan, i + 2, self._planned)
        self._base = torch.where(replan, 0, self._base)
        return keep | (cand & (rank == 0))


def _best_of_rows(confidence, candidates):
    """Bool (B, c): the most confident column of each row that has a candidate (argmax scattered
    into the mask, no boolean indexing)."""
    best = confidence.argmax(-1, keepdim=True)
    has = candidates.any(-1, keepdim=True)
    return torch.zeros_like(candidates).scatter_(-1, best, has)
