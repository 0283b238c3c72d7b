"""The plugin contract as pytest tests, for the plugins named with `--dare-plugin NAME` (repeatable).

`pytest --dare-plugin NAME` adds this module to any pytest run (the option comes with the package,
through the `pytest11` entry point); `dare-pipeline plugins test NAME` runs it alone. The plugin
must be installed (found through the `dare_pipeline` entry-point group). What each test checks:
`dare_pipeline.plugin_kit.checks`.
"""

from __future__ import annotations

import pytest

from dare_pipeline.plugin_kit import checks

FAMILIES = list(checks.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_options_reproduce_the_recipe_without_the_plugin(dare_plugin, family):
    if not checks.has_exactness_check(dare_plugin):
        pytest.skip(f"{dare_plugin}: no exact_options, or a decoding policy")
    checks.check_exact_options(dare_plugin, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_options_stacked_on_every_row_feeder_and_policy(dare_plugin, family):
    if not checks.has_exactness_check(dare_plugin):
        pytest.skip(f"{dare_plugin}: no exact_options, or a decoding policy")
    for i, (feeder, policy) in enumerate(checks.stacks(dare_plugin)):
        checks.check_exact_stacked(dare_plugin, family, feeder, policy, variant=i + FAMILIES.index(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_options_keep_the_cache_invariant(dare_plugin, family):
    if not checks.has_invariant_check(dare_plugin):
        pytest.skip(f"{dare_plugin}: no reuse objects, no exact_options, or a decoding policy")
    checks.check_cache_invariant(dare_plugin, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_are_complete_and_reset_between_generations(dare_plugin, family):
    checks.check_stats_and_reset(dare_plugin, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_counted_are_rows_that_entered_the_projections(dare_plugin, family):
    checks.check_counted_rows(dare_plugin, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_decodes_each_prompt_as_alone(dare_plugin, family):
    checks.check_batch_invariance(dare_plugin, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_aborted_generation_leaves_the_pipeline_as_new(dare_plugin, family):
    checks.check_abort_recovery(dare_plugin, family)
