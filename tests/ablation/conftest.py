"""Fixtures for the ablation tests: a tiny random LLaDA saved with the project's tokenizer (built
like tests/evaluation's), and helpers to write an ablation file around it."""

import attrs
import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

# two problems per run: enough for accuracy, NFE and tokens/s to be real numbers, fast on one thread
GEN_SET = ["generation.gen_length=32", "generation.steps=32", "generation.block_length=16"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from dare_pipeline.models.saving import save_checkpoint
    from dare_pipeline.testing import tiny_model
    from dare_pipeline.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE

    model = tiny_model("llada", vocab_size=VOCAB_SIZE, d_model=32, n_heads=2, max_sequence_length=640)
    model.config = attrs.evolve(model.config, mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                bos_token_id=BOS_ID)
    with torch.no_grad():
        model.lm_head.weight[MASK_ID] = 0
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=True)


@pytest.fixture
def write_ablation(tmp_path, tiny_ckpt):
    """write_ablation(**fields) -> path of an ablation YAML on the tiny checkpoint (dare_add, limit 2)."""

    def write(name="tiny", **fields):
        doc = {"name": name, "model": str(tiny_ckpt), "tasks": ["dare_add"], "limit": 2, "set": list(GEN_SET)}
        doc.update(fields)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write
