"""Guided diffusion through lm-eval: the `dare` model decodes as Pipeline.generate with a guided
recipe, and the FLOPs it reports include the guide's forwards."""

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from dare_pipeline import Pipeline, load_model
from dare_pipeline.evaluation.lm_eval_model import DareLM
from dare_pipeline.plugin_kit.testing import save_tiny_suite_checkpoint

GEN = {"gen_length": 32, "steps": 32, "block_length": 16}
RECIPE = {"name": "guided", "plugins": [{"name": "dual_cache", "head_commit": "off"},
                                        {"name": "guided_diffusion", "verify_window": 8}]}
CONTEXTS = ["Q: reverse abc\nA: ", "Q: add 1+2\nA: ", "Q: sort q,b,k\nA: "]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # a random LLaDA with the suite's tokenizer: the embedded guide's vocabulary (guide: default)
    return save_tiny_suite_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_generate_until_equals_the_pipeline_and_counts_the_guide(tiny_dir):
    lm = DareLM(model=str(tiny_dir), recipe=RECIPE, batch_size=2, **GEN)
    requests = [Instance("generate_until", {}, (c, {"until": ["\n\n"]}), i) for i, c in enumerate(CONTEXTS)]
    got = lm.generate_until(requests)
    pipe = Pipeline(load_model(tiny_dir), {**RECIPE, "generation": GEN})
    want = [pipe.generate([c]).text[0].split("\n\n")[0] for c in CONTEXTS]
    assert got == want
    stats = lm.stats.to_dict()
    guided = stats["plugins"]["guided_diffusion"]
    assert guided["guide_forwards"] > 0 and guided["guide_flops"] > 0
    flops = stats["flops"]
    assert flops["guide"] == guided["guide_flops"]
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
