"""Guided diffusion stacked on the rest of the engine, with the embedded pair: a prompt decodes the
same alone and in a batch under every stack (caches, DARE, FFN reuse, dLLM-Cache, the threshold
union, the top-k rule), exact caches leave its tokens unchanged, compiled execution decodes the
same tokens (the guide eager), and streaming reports the early stop's commits."""

from __future__ import annotations

import pytest
import torch

from dare_pipeline import Pipeline, Recipe, load_model
from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl
from dare_pipeline.plugin_kit.testing import commit_order

torch.set_num_threads(1)

NAME = "guided_diffusion"
GEN = {"gen_length": 64, "block_length": 32, "steps": 64}
HELDOUT = read_jsonl(HELDOUT_FILE)
PROMPTS = [p["prompt"] for p in HELDOUT[8:11]]  # three lengths: the batch is left-padded
GUIDED = {"name": NAME}
STACKS = {
    "guided": [GUIDED],
    "top_k_relative, no early stop": [{"name": NAME, "accept": "top_k_relative", "stop_at_eos": False}],
    "windows of 8": [{"name": NAME, "verify_window": 8}],
    "dual_cache": [{"name": "dual_cache", "head_commit": "off"}, GUIDED],
    "dual_cache + threshold": [{"name": "dual_cache", "head_commit": "off"}, {"name": NAME, "also_commit_above": 0.9}],
    "FreeCache (prefix_cache frozen blocks)": [{"name": "prefix_cache", "freeze_finished_blocks": True,
                                                "head_commit": "off"}, GUIDED],
    "dare_kv": [{"name": "dual_cache", "head_commit": "off"}, GUIDED, {"name": "dare_kv", "threshold": 0.1}],
    "dare_o": [GUIDED, {"name": "dare_o", "threshold": 0.1}],
    "ffn_reuse": [GUIDED, "ffn_reuse"],
    "dllm_cache": [GUIDED, "dllm_cache"],
}


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def _pipe(model, plugins, **extra):
    return Pipeline(model, Recipe.from_dict({"generation": GEN, "plugins": plugins, **extra}))


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_prompt_decodes_the_same_alone_and_in_a_batch(stack, model):
    pipe = _pipe(model, STACKS[stack])
    together = pipe.generate(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = pipe.generate([prompt])
        assert together.sequences[i] == alone.sequences[0], f"{stack}: prompt {i}"
        assert commit_order(together.unmask_step[i]) == commit_order(alone.unmask_step[0]), f"{stack}: prompt {i}"
    names = [p if isinstance(p, str) else p["name"] for p in STACKS[stack]]
    for name in names:
        if name in ("dare_kv", "dare_o", "ffn_reuse", "dllm_cache", "dual_cache", "prefix_cache"):
            assert together.stats.plugins[name], f"{name} reported nothing"
    assert together.stats.plugins[NAME]["guide_forwards"] > 0


@pytest.mark.parametrize("cache", ["dual_cache", "prefix_cache"])
def test_exact_caches_leave_the_tokens_unchanged(cache, model):
    exact = {"name": cache, "refresh_every": 1, "head_commit": "off"}
    alone = _pipe(model, [GUIDED]).generate(PROMPTS)
    cached = _pipe(model, [exact, GUIDED]).generate(PROMPTS)
    assert cached.sequences == alone.sequences and cached.unmask_step == alone.unmask_step


def test_compiled_execution_decodes_the_same_tokens_with_the_guide_eager(model):
    eager = _pipe(model, STACKS["dual_cache"]).generate(PROMPTS)
    compiled = _pipe(model, STACKS["dual_cache"], execution={"mode": "compiled", "backend": "aot_eager"})
    out = compiled.generate(PROMPTS)
    assert out.sequences == eager.sequences and out.unmask_step == eager.unmask_step
    assert out.stats.execution["mode"] == "compiled"
    assert out.stats.plugins[NAME]["guide_execution"] == "eager"


def test_streaming_reports_every_commit_the_early_stop_included(model):
    pipe = _pipe(model, [GUIDED])
    stream = pipe.stream(PROMPTS[1:], gen_length=128, steps=128)  # sort and reverse: short answers
    events = list(stream)
    out = stream.output
    assert len(events) == out.stats.nfe < 4  # four blocks, the answers end in the first
    assert out.stats.plugins[NAME]["eos_filled"] > 0
    for b in range(2):
        positions = sorted(p for e in events for p in e.prompts[b].positions)
        assert positions == list(range(128)), "every answer position is reported once"
        assert events[-1].prompts[b].finished and events[-1].prompts[b].text == out.text[b]


def test_the_embedded_guide_guides_the_embedded_dream_model():
    model = load_model("default-dream")
    problems = HELDOUT[:4]
    out = Pipeline(model, {"generation": GEN, "plugins": [GUIDED]}).generate([p["prompt"] for p in problems])
    assert [t.split("#### ")[-1] for t in out.text] == [p["final"] for p in problems]
    assert out.stats.plugins[NAME]["accepted_per_forward_mean"] > 8
