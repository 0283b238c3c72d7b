"""dLLM-Cache decodes a prompt to the same tokens alone and in any batch, on the golden tiny LLaDA and
Dream (greedy, gen 32, block 16, steps 32, the plugin's default options).

These prompts decoded differently alone and batched from position 16 on while V-verify ranked raw
cosine similarities: most response rows barely move between forwards (similarities 0.9999999 ± one
ulp), and the forward's rounding differs by ~1e-7 between batch shapes, so the rows at the
selection boundary were decided by the batch. The plugin ranks rounded similarities, ties in column
order.
"""

from __future__ import annotations

import pytest

from dare_pipeline import Pipeline, Recipe

ISSUE_PROMPTS = [[84], [32, 132, 359, 80, 228, 270, 453, 249], [309, 386, 0, 452, 19, 253, 166, 159, 428],
                 [25, 414, 421, 448, 498, 415, 212, 96]]
# with ISSUE_PROMPTS, a batch in which [477, ...], [16, 313, 336] and [431] decoded differently on Dream
DREAM_BATCH = ISSUE_PROMPTS + [
    [97, 469], [113, 122, 411, 72, 411, 278, 229, 46, 41, 163], [477, 250, 55, 154, 282, 149, 361, 63, 280],
    [417, 472, 276, 104, 409, 308], [300, 147, 227, 46, 305, 408, 197, 162, 294], [148, 94, 96, 420],
    [16, 313, 336], [243, 35, 45, 347, 387], [448, 76, 472], [431], [459, 358],
    [349, 200, 428, 361, 268, 141, 267, 415, 120]]
RECIPE = {"generation": {"gen_length": 32, "block_length": 16, "steps": 32}, "plugins": [{"name": "dllm_cache"}]}


@pytest.mark.parametrize("family, batch", [("llada", ISSUE_PROMPTS), ("dream", DREAM_BATCH)])
def test_each_prompt_decodes_alone_as_in_its_batch(golden_models, family, batch):
    pipe = Pipeline(golden_models[family], Recipe.from_dict(RECIPE))
    together = pipe.generate(batch)
    assert together.stats.plugins["dllm_cache"]["rows_reused"] > 0
    for i, prompt in enumerate(batch):
        alone = pipe.generate([prompt])
        assert alone.sequences[0] == together.sequences[i], f"prompt {i} {prompt}"
        assert alone.unmask_step[0] == together.unmask_step[i], f"prompt {i} {prompt}"
