"""DARE-KV / DARE-O / FFN reuse / dLLM-Cache under a variable-step policy decode a prompt alone as in its
batch, and count in a batch exactly the rows its prompts computed.

A prompt whose block is complete waits while the rest of its batch decodes. These stacks decoded
the second or third prompt differently in a batch: the waiting forwards recomputed its block rows
(taking new reference queries and cached rows that alone it never had) and advanced its
`refresh_every` schedule. A waiting prompt's rows are now reused and nothing of it is written or
counted, and each prompt's refresh schedule counts its own forwards.

Counted work is work done: a prompt alone (no padding, never waiting) counts per layer the rows that
entered the projections (q_proj, k_proj, o_proj, gate_proj: counting hooks), and a batch counts the
sum of its prompts alone, so the rows of a prompt waiting for its batch, which run nothing, are not
counted as eligible or reused.
"""

from __future__ import annotations

import contextlib

import pytest

from dare_pipeline import Pipeline
from dare_pipeline.plugin_kit.testing import commit_order

PROMPTS = [[172, 485, 388, 43, 0, 175, 248, 322, 51], [62, 487, 67, 37], [179, 100, 173]]
FACTOR = {"name": "factor_decoding", "factor": 2.62}
THRESHOLD = {"name": "threshold_decoding", "threshold": 0.5}
REUSE = {"dare_kv", "dare_o", "ffn_reuse", "dllm_cache"}
# the projection each counted sub-operation's rows go through
PROJECTIONS = {"q": "q_proj", "kv": "k_proj", "attn": "o_proj", "ffn": "gate_proj"}


@contextlib.contextmanager
def _rows_entering(model):
    """Per layer and sub-operation, the rows that entered its projection (updated while open)."""
    seen = [dict.fromkeys(PROJECTIONS, 0) for _ in model.layers]

    def count(module, args, output, layer, sub):
        seen[layer][sub] += args[0].numel() // args[0].shape[-1]

    handles = [getattr(layer, proj).register_forward_hook(
        lambda module, args, output, i=i, sub=sub: count(module, args, output, i, sub))
        for i, layer in enumerate(model.layers) for sub, proj in PROJECTIONS.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _counted(out, name) -> list[dict]:
    """Per layer: the plugin's eligible and reused rows and its recomputed rows per sub-operation."""
    return [{"eligible": layer["eligible"], "reused": layer["reused"], **layer["recomputed"]}
            for layer in out.stats.plugins[name]["per_layer"]]


def _summed(counts: list[list[dict]]) -> list[dict]:
    return [{key: sum(c[layer][key] for c in counts) for key in counts[0][layer]} for layer in range(len(counts[0]))]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("stack", [
    [FACTOR, {"name": "dare_o"}], [THRESHOLD, {"name": "dare_o"}],
    [FACTOR, {"name": "dare_o", "threshold": 0.077, "refresh_every": 2}],
    [FACTOR, {"name": "dare_kv"}, {"name": "dare_o", "threshold": 0.077, "refresh_every": 2}],
    [THRESHOLD, {"name": "dare_kv", "threshold": 0.1, "refresh_every": 3}],
    [FACTOR, {"name": "ffn_reuse"}], [THRESHOLD, {"name": "ffn_reuse", "threshold": 0.077, "refresh_every": 2}],
    [THRESHOLD, {"name": "dllm_cache"}], [THRESHOLD, {"name": "dllm_cache", "prompt_interval": 5, "response_interval": 3}],
], ids=["factor+dare_o", "threshold+dare_o", "factor+dare_o_refresh2", "factor+dare_kv+dare_o_refresh2",
        "threshold+dare_kv_refresh3", "factor+ffn_reuse", "threshold+ffn_reuse_refresh2", "threshold+dllm_cache",
        "threshold+dllm_cache_5_3"])
def test_each_prompt_decodes_alone_as_in_its_batch(golden_models, stack, temperature):
    model = golden_models["dream"]
    gen = {"gen_length": 32, "block_length": 16, "steps": 16, "temperature": temperature, "seed": 2}
    pipe = Pipeline(model, {"generation": gen, "plugins": stack})
    together = pipe.generate(PROMPTS)
    alone, entered = [], []
    for i, prompt in enumerate(PROMPTS):
        with _rows_entering(model) as seen:
            alone.append(pipe.generate([prompt]))
        entered.append(seen)
        assert alone[i].sequences[0] == together.sequences[i], f"prompt {i}"
        assert commit_order(alone[i].unmask_step[0]) == commit_order(together.unmask_step[i]), f"prompt {i}"
    if stack[0] is THRESHOLD:  # under it some prompt of this batch waits for the others (not always under factor)
        assert together.stats.nfe > min(out.stats.nfe for out in alone)
    for name in (p["name"] for p in stack if p["name"] in REUSE):
        for out, seen in zip(alone, entered):
            for layer, counted in enumerate(_counted(out, name)):
                for sub in (s for s in PROJECTIONS if s in counted):
                    assert counted[sub] == seen[layer][sub], (name, layer, sub)
        assert _counted(together, name) == _summed([_counted(out, name) for out in alone]), name
        if name == "dllm_cache":
            kinds = [out.stats.plugins[name]["refresh_counts"] for out in alone]
            assert together.stats.plugins[name]["refresh_counts"] == {k: sum(c[k] for c in kinds) for k in kinds[0]}
