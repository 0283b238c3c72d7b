"""The dare-pipeline plugin contract, shipped with dare-pipeline, run against this package's plugin
(installed: `pip install -e .`): exactness under exact_options, alone and stacked on every row feeder
and decoding policy, the cache invariant, batch invariance, complete stats, counted rows, state reset,
abort recovery."""

import pytest

# the contract's tests, collected in this module (new checks of later dare-pipeline versions join)
from dare_pipeline.plugin_kit.contract import *


@pytest.fixture
def dare_plugin():
    return "input_drift"
