"""Fixtures for the ablation tests: a tiny random LLaDA saved with the project's tokenizer (built
like tests/evaluation's), and helpers to write an ablation file around it."""

import pytest
import yaml

from dare_pipeline.plugin_kit.testing import save_tiny_suite_checkpoint

pytest.importorskip("lm_eval")

# two problems per run: enough for accuracy, NFE and tokens/s to be real numbers, fast on one thread
GEN_SET = ["generation.gen_length=32", "generation.steps=32", "generation.block_length=16"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_suite_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def write_ablation(tmp_path, tiny_ckpt):
    """write_ablation(**fields) -> path of an ablation YAML on the tiny checkpoint (dare_add, limit 2)."""

    def write(name="tiny", **fields):
        doc = {"name": name, "model": str(tiny_ckpt), "tasks": ["dare_add"], "limit": 2, "set": list(GEN_SET), "repeats": 0}
        doc.update(fields)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write
