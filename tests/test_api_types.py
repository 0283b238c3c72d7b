"""Pipeline's model argument: a loaded model, or a checkpoint directory ("default" included) that
it loads with the recipe's dtype and device; anything else is a TypeError saying what is expected,
not an internal message about weak references."""

from __future__ import annotations

import pytest

from dare_pipeline import Pipeline, generate


def test_a_checkpoint_name_is_loaded():
    pipe = Pipeline("default", {"dtype": "float32"})
    assert pipe.model.config.family == "llada" and str(pipe.model.source).endswith("llada")
    out = generate("default", "Q: add 1+2\nA: ", gen_length=32, steps=32)
    assert out.text == Pipeline("default").generate("Q: add 1+2\nA: ", gen_length=32, steps=32).text


@pytest.mark.parametrize("model, shown", [(3, "3"), (None, "None"), ({"config": 1}, "{'config': 1}")])
def test_anything_else_is_a_type_error_that_says_what_is_expected(model, shown):
    with pytest.raises(TypeError, match=rf"^model = {shown}: expected a model from load_model\(\), or a checkpoint "
                                        r"directory \(\"default\": the embedded model\) to load$"):
        Pipeline(model)
