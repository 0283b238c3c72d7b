"""DARE-KV / DARE-O / FFN reuse under a variable-step policy decode a prompt alone as in its batch.

A prompt whose block is complete waits while the rest of its batch decodes. These stacks decoded
the second or third prompt differently in a batch: the waiting forwards recomputed its block rows
(taking new reference queries and cached rows that alone it never had) and advanced its
`refresh_every` schedule. A waiting prompt's rows are now reused and nothing of it is written or
counted, and each prompt's refresh schedule counts its own forwards.
"""

from __future__ import annotations

import pytest

from dare_pipeline import Pipeline
from dare_pipeline.plugin_kit.testing import commit_order

PROMPTS = [[172, 485, 388, 43, 0, 175, 248, 322, 51], [62, 487, 67, 37], [179, 100, 173]]
FACTOR = {"name": "factor_decoding", "factor": 2.62}
THRESHOLD = {"name": "threshold_decoding", "threshold": 0.5}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("stack", [
    [FACTOR, {"name": "dare_o"}], [THRESHOLD, {"name": "dare_o"}],
    [FACTOR, {"name": "dare_o", "threshold": 0.077, "refresh_every": 2}],
    [FACTOR, {"name": "dare_kv"}, {"name": "dare_o", "threshold": 0.077, "refresh_every": 2}],
    [THRESHOLD, {"name": "dare_kv", "threshold": 0.1, "refresh_every": 3}],
    [FACTOR, {"name": "ffn_reuse"}], [THRESHOLD, {"name": "ffn_reuse", "threshold": 0.077, "refresh_every": 2}],
], ids=["factor+dare_o", "threshold+dare_o", "factor+dare_o_refresh2", "factor+dare_kv+dare_o_refresh2",
        "threshold+dare_kv_refresh3", "factor+ffn_reuse", "threshold+ffn_reuse_refresh2"])
def test_each_prompt_decodes_alone_as_in_its_batch(golden_models, stack, temperature):
    gen = {"gen_length": 32, "block_length": 16, "steps": 16, "temperature": temperature, "seed": 2}
    pipe = Pipeline(golden_models["dream"], {"generation": gen, "plugins": stack})
    together = pipe.generate(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = pipe.generate([prompt])
        assert alone.sequences[0] == together.sequences[i], f"prompt {i}"
        assert commit_order(alone.unmask_step[0]) == commit_order(together.unmask_step[i]), f"prompt {i}"
    eligible = together.stats.plugins[stack[-1]["name"]]["rows_eligible"]
    assert eligible == sum(pipe.generate([p]).stats.plugins[stack[-1]["name"]]["rows_eligible"] for p in PROMPTS)
