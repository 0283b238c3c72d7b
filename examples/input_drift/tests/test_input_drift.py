"""input_drift's own behaviour on the contract's tiny random models."""

import pytest

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.config import ConfigError
from dare_pipeline.plugin_kit import checks


def test_a_negative_threshold_is_refused_with_the_key_and_value():
    with pytest.raises(ConfigError, match=r"plugins\[0\]: threshold = -1.0: must be >= 0.0"):
        Recipe.from_dict({"plugins": [{"name": "input_drift", "threshold": -1.0}]})


def test_exempt_layers_beyond_the_model_are_refused():
    recipe = {"generation": checks.GEN, "plugins": [{"name": "input_drift", "exempt_layers": [7]}]}
    with pytest.raises(ValueError, match=r"exempt_layers = \[7\]: the model has 3 layers"):
        Pipeline(checks.model("llada"), recipe).generate(checks.prompts())


@pytest.mark.parametrize("family", checks.FAMILIES)
def test_a_loose_threshold_reuses_attention_rows_and_computes_fewer(family):
    model = checks.model(family)
    recipe = {"generation": checks.GEN, "plugins": [{"name": "input_drift", "threshold": 0.5}]}
    out = Pipeline(model, recipe).generate(checks.prompts())
    report = out.stats.plugins["input_drift"]
    assert 0 < report["rows_reused"] <= report["rows_eligible"]
    rows = out.stats.rows_by_layer()
    assert sum(r["attn"] for r in rows) < sum(r["q"] for r in rows)  # reused rows skipped attention


@pytest.mark.parametrize("family", checks.FAMILIES)
def test_a_prompt_waiting_for_its_batch_is_neither_counted_nor_changed(family):
    """Threshold decoding finishes some prompts' blocks early; they wait, fed, for the rest of the batch.
    Each prompt's rows are counted as alone, so the batch's counts are the sum of theirs."""
    model, batch = checks.model(family), checks.prompts()
    recipe = {"generation": checks.GEN, "plugins": ["threshold_decoding", {"name": "input_drift", "threshold": 0.5}]}
    together = Pipeline(model, recipe).generate(batch).stats
    alone = [Pipeline(model, recipe).generate([prompt]).stats for prompt in batch]
    assert together.nfe > min(s.nfe for s in alone)  # some prompt waited
    for key in ("rows_eligible", "rows_reused"):
        assert together.plugins["input_drift"][key] == sum(s.plugins["input_drift"][key] for s in alone), key
