"""The embedded guide: shipped beside the embedded diffusion weights (package data), a standard
transformers causal LM loadable offline, with the embedded model's tokenizer files byte for byte,
and it knows the suite on its own (greedy, alone; the 500-problem figure is in docs/default_model.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch
from dare_pipeline_plugins.guided_diffusion import embedded_guide

from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score
from dare_pipeline.models.default import EMBEDDED

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "dare_pipeline" / "models" / "default" / "guide"


def test_the_embedded_guide_lives_beside_the_embedded_weights():
    assert embedded_guide().resolve() == GUIDE.resolve()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "models/default/**/*" in data["dare_pipeline"]  # the guide ships with the package


def test_its_tokenizer_files_are_the_embedded_models_byte_for_byte():
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        for model in ("default", "default-dream"):
            assert (GUIDE / name).read_bytes() == (EMBEDDED[model] / name).read_bytes(), (name, model)


def test_it_is_a_small_llama_that_answers_alone():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    guide = AutoModelForCausalLM.from_pretrained(str(GUIDE), local_files_only=True).eval()
    assert type(guide).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in guide.parameters()) == 554_752
    from dare_pipeline.models.tokenizer import EOS_ID, build_tokenizer

    tok = build_tokenizer()
    problems = read_jsonl(HELDOUT_FILE)[:4]
    for p in problems:
        ids = torch.tensor([tok.encode(p["prompt"])])
        with torch.no_grad():
            out = guide.generate(input_ids=ids, max_new_tokens=64, do_sample=False, eos_token_id=EOS_ID,
                                 pad_token_id=0)
        answer = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        assert score(p, answer)["exact_match"], (p["question"], answer)
