"""Fast-dLLM's confidence-aware parallel decoding (methods.md section 2): commit every candidate of
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
masked; a rejection there plans one more step with a base quota of 0.

Options:
  threshold  probability a candidate needs (0.9 in the paper)
  quota      auto: quota mode for Dream when the whole answer is one block and the block's first
             forward is decided by this policy (the reference's no-cache decoder); on; off
"""

from __future__ import annotations

import attrs
import torch

from dare_pipeline.config_loading import choice, in_range
from dare_pipeline.hookspecs import hookimpl
from dare_pipeline.plugin import Plugin


@attrs.frozen(kw_only=True)
class ThresholdOptions:
    threshold: float = attrs.field(default=0.9, validator=in_range(0.0, 1.0))
    quota: str = attrs.field(default="auto", validator=choice("auto", "on", "off"))


class ThresholdDecoding(Plugin):
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
                steps = state.steps_per_block
                masked = proposal.candidates.sum(-1)
                self._base = (masked // steps).tolist()
                self._left = [0] * state.batch
                self._planned = [steps] * state.batch
        if self._quota_mode:
            return self._select_quota(state, proposal)
        return self._select_threshold(proposal)

    def _select_threshold(self, proposal):
        cand = proposal.candidates
        committed = cand & (proposal.probability >= self.options.threshold)
        best = proposal.confidence.argmax(-1)
        has = cand.any(-1)
        committed[has, best[has]] = True
        return committed

    def _select_quota(self, state, proposal):
        thr = self.options.threshold
        i = state.step_in_block
        committed = torch.zeros_like(proposal.candidates)
        for b in range(state.batch):
            n = int(proposal.candidates[b].sum())
            if n == 0:
                continue
            last = i >= self._planned[b] - 1
            quota = n if last else min(n, self._base[b] + self._left[b])
            self._left[b] = 0
            _, idx = torch.topk(proposal.confidence[b], quota)
            committed[b, idx[0]] = True
            if quota > 1:
                keep = proposal.probability[b, idx[1:]] >= thr
                committed[b, idx[1:][keep]] = True
                rejected = int((~keep).sum())
                self._left[b] = rejected
                if last and rejected:
                    self._planned[b] = i + 2
                    self._base[b] = 0
        return committed
