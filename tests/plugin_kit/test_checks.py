"""The shipped contract checks fail for plugins that break the contract (each check, one way it breaks)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import pytest

from dare_pipeline.config import at_least
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.core.registry import registered
from dare_pipeline.plugin_kit import checks
from dare_pipeline.reuse import ATTN_OUT, LayerReuse


@attrs.frozen
class ThresholdOptions:
    threshold: float = attrs.field(default=0.5, validator=at_least(0.0))


class _ReuseLeftColumns(LayerReuse):
    """Reuses the attention output of written rows left of `column` when threshold > 0 (or always)."""

    decisions = frozenset({"attn_rows"})
    fields = frozenset({ATTN_OUT})

    def __init__(self, plugin):
        self.plugin = plugin

    def attn_rows(self, call, q):
        written = call.store.written(ATTN_OUT, call.layer)[:, call.active]
        left = (call.active < self.plugin.column(call))[None]
        reuse = written & left & self.plugin.reusing()
        return ~reuse


class InexactAtZero(Plugin):
    """Claims threshold 0 is exact but reuses the leftmost columns anyway."""

    name = "inexact_at_zero"
    Options = ThresholdOptions
    provides = frozenset({"attn_rows"})
    exact_options: ClassVar[dict[str, Any]] = {"threshold": 0.0}

    def column(self, call):
        return 6

    def reusing(self):
        return True

    @hookimpl
    def dare_layer_reuse(self, state):
        return _ReuseLeftColumns(self)


class BatchDependent(InexactAtZero):
    """Reuses stale attention rows only when it decodes several prompts together."""

    name = "batch_dependent"
    exact_options: ClassVar[dict[str, Any]] = {"threshold": 0.0}

    @hookimpl
    def dare_generation_start(self, state):
        self.batch = state.x.shape[0]
        self.end = state.x.shape[1] - state.gen.gen_length + 8

    def column(self, call):
        return self.end

    def reusing(self):
        return self.options.threshold > 0 and self.batch > 1


class NudgesValues(Plugin):
    """Claims exactness but nudges the stored values of the first columns by 1e-3: tokens survive it,
    logits do not."""

    name = "nudges_values"
    exact_options: ClassVar[dict[str, Any]] = {}

    @hookimpl
    def dare_layer_reuse(self, state):
        class Nudge(LayerReuse):
            decisions = frozenset({"attn_rows"})

            def attn_rows(self, call, q):  # after the fresh K/V are stored, before attention reads them
                call.store.values(call.layer)[:, :, :2] += 1e-3  # and every row recomputes its attention

        return Nudge()


class LeakyCounter(Plugin):
    """Keeps a counter across generations (never reset in dare_generation_start)."""

    name = "leaky_counter"
    exact_options: ClassVar[dict[str, Any]] = {}
    steps = 0

    @hookimpl
    def dare_step_end(self, state, committed):
        type(self).steps += 1

    @hookimpl
    def dare_report_stats(self, state):
        return {"steps": type(self).steps}


class UncountedFfn(Plugin):
    """Runs the FFN of every row a second time on its own (uncounted work) and reports nothing of it."""

    name = "uncounted_ffn"
    exact_options: ClassVar[dict[str, Any]] = {}

    @hookimpl
    def dare_layer_reuse(self, state):
        class Probe(LayerReuse):
            decisions = frozenset({"attn_rows"})

            def attn_rows(self, call, q):
                call.module.ffn(call.h)  # and no decision: every row recomputes its attention

        return Probe()


def test_a_plugin_that_is_inexact_at_its_exact_options_fails():
    with registered(InexactAtZero), pytest.raises(AssertionError, match="tokens differ|commit steps differ"):
        checks.check_exact_options("inexact_at_zero", "llada")


def test_an_inexactness_the_tokens_hide_fails_on_the_logits():
    with registered(NudgesValues), pytest.raises(AssertionError, match="logits of forward"):
        checks.check_exact_options("nudges_values", "llada")


def test_a_plugin_whose_decisions_depend_on_the_batch_fails():
    with registered(BatchDependent):
        checks.check_exact_options("batch_dependent", "llada")  # exact at zero: the breakage is elsewhere
        with pytest.raises(AssertionError, match="in a batch"):
            checks.check_batch_invariance("batch_dependent", "llada")


def test_state_kept_across_generations_fails():
    with registered(LeakyCounter), pytest.raises(AssertionError, match="plugin stats differ"):
        checks.check_stats_and_reset("leaky_counter", "dream")


def test_work_the_stats_do_not_count_fails():
    with registered(UncountedFfn), pytest.raises(AssertionError, match="entered gate_proj"):
        checks.check_counted_rows("uncounted_ffn", "llada")


def test_an_unknown_plugin_name_says_what_is_installed():
    with pytest.raises(AssertionError, match="no plugin named 'nope' is installed.*dare_o"):
        checks.check_exact_options("nope", "llada")


def test_stacks_leave_out_what_a_plugin_refuses():
    assert (None, None) in checks.stacks("ffn_reuse")
    assert ("dual_cache", "threshold_decoding") in checks.stacks("ffn_reuse")
    assert all(feeder is None for feeder, _ in checks.stacks("dllm_cache"))  # it refuses row feeders
    assert all(policy is None for _, policy in checks.stacks("threshold_decoding"))  # itself a policy



class SkipsSuffixKeys(Plugin):
    """Claims exactness, but keeps the stored keys and values of every row right of the fed columns
    out of attention (a dual cache's suffix dropped): full-canvas decodes cannot see it."""

    name = "skips_suffix_keys"
    exact_options: ClassVar[dict[str, Any]] = {}

    @hookimpl
    def dare_layer_reuse(self, state):
        class DropSuffix(LayerReuse):
            decisions = frozenset({"attn_rows"})

            def attn_rows(self, call, q):  # attention reads the store after this: zero the suffix's values
                stop = int(call.active[-1]) + 1
                call.store.values(call.layer)[:, :, stop:] = 0
                return None  # every row recomputes its attention

        return DropSuffix()


def test_a_plugin_that_breaks_the_cache_invariant_fails():
    with registered(InexactAtZero), pytest.raises(AssertionError, match="differ from the full forward's"):
        checks.check_cache_invariant("inexact_at_zero", "llada")


def test_a_plugin_exact_on_whole_canvas_forwards_only_fails_the_invariant():
    with registered(SkipsSuffixKeys):
        checks.check_exact_options("skips_suffix_keys", "dream")  # whole-canvas forwards: nothing to drop
        with pytest.raises(AssertionError, match=r"fed columns \(\d+, \d+\).*differ from the full forward's"):
            checks.check_cache_invariant("skips_suffix_keys", "dream")


def test_the_cache_invariant_applies_to_exact_reuse_plugins_only():
    assert checks.has_invariant_check("dare_kv") and checks.has_invariant_check("dllm_cache")
    assert not checks.has_invariant_check("dual_cache")  # a row feeder: no reuse objects
    assert not checks.has_invariant_check("threshold_decoding")
    whole = checks.invariant_cases(whole_canvas_only=True)
    assert [case.fed for case in whole] == [(0, whole[0].length)]
    assert len(checks.invariant_cases()) == 3
