"""One contract for every registered plugin (built-in, third-party, added later: it joins automatically).

The checks are the ones the package ships for third-party authors (`dare_pipeline.plugin_kit.checks`,
run there by `pytest --dare-plugin NAME`); here they run for each plugin found through the
entry-point group, plus the example third-party plugin in examples/step_logger installed the way
tests/core/test_entry_points.py does it. Every plugin runs with its default options (plus the exact
ones for the exactness checks), on tiny random models of both families.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dare_pipeline.core.registry import available_plugins
from dare_pipeline.plugin_kit import checks

torch.set_num_threads(1)

EXAMPLE = Path(__file__).parents[2] / "examples" / "step_logger"


def _install_example(target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(EXAMPLE)], check=True)


@pytest.fixture(scope="module", autouse=True)
def example_plugin(tmp_path_factory):
    """The example third-party plugin, installed into a temporary directory for this module."""
    target = tmp_path_factory.mktemp("site")
    _install_example(target)
    sys.path.insert(0, str(target))
    yield
    sys.path.remove(str(target))
    for mod in [m for m in sys.modules if m.startswith("dare_step_logger")]:
        del sys.modules[mod]


def _plugin_names() -> list[str]:
    # the example's entry point is not visible at collection time (installed by the fixture)
    return sorted(set(available_plugins()) | {"step_logger"})


FAMILIES = list(checks.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_exact_options_reproduce_the_recipe_without_the_plugin(name, family):
    if not checks.has_exactness_check(name):
        pytest.skip(f"{name}: no exactness setting (exact_options None) or a decoding policy")
    checks.check_exact_options(name, family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_exact_options_stacked_on_every_row_feeder_and_policy(name, family):
    if not checks.has_exactness_check(name):
        pytest.skip(f"{name}: no exactness setting (exact_options None) or a decoding policy")
    for i, (feeder, policy) in enumerate(checks.stacks(name)):
        checks.check_exact_stacked(name, family, feeder, policy, variant=i + FAMILIES.index(family))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_exact_options_keep_the_cache_invariant(name, family):
    if not checks.has_invariant_check(name):
        pytest.skip(f"{name}: no reuse objects, no exactness setting (exact_options None) or a decoding policy")
    checks.check_cache_invariant(name, family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_stats_are_complete_and_reset_between_generations(name, family):
    checks.check_stats_and_reset(name, family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_rows_counted_are_rows_that_entered_the_projections(name, family):
    checks.check_counted_rows(name, family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_batch_decodes_each_prompt_as_alone(name, family):
    checks.check_batch_invariance(name, family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", _plugin_names())
def test_an_aborted_generation_leaves_the_pipeline_as_new(name, family):
    checks.check_abort_recovery(name, family)


def test_the_contract_shipped_for_pytest_is_these_checks():
    """`pytest --dare-plugin NAME` runs the same test names as this module (one contract)."""
    from dare_pipeline.plugin_kit import contract

    shipped = sorted(n for n in vars(contract) if n.startswith("test_"))
    here = sorted(n for n in globals() if n.startswith("test_") and n != "test_the_contract_shipped_for_pytest_is_these_checks")
    assert shipped == here
