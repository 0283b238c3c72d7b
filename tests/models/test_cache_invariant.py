"""The invariant every cache and reuse plugin rests on, as a property: with exact cache contents, a
forward over any subset of rows gives the same logits and hidden states for those rows as the full
forward (`dare_pipeline.plugin_kit.invariant`: how the case runs, what is compared, and why within
1e-4).

Drawn: the family (LLaDA; Dream with grouped-query attention, two or four query heads per key/value
head), layers, a batch of 1-3 left-padded prompts of different lengths, the answer's length and
tokens (masks among them), the fed columns in the forms the row feeders feed them (the whole
canvas, a suffix [s, L) as the prefix cache's, a block [s, e) as the dual cache's, one column),
the head rows asked for (all, or any subset), and the reuse objects at their exact settings
(DARE-KV, DARE-O, FFN reuse at threshold 0, alone and stacked; dLLM-Cache refreshing at every
forward, over the whole canvas only, as it refuses row feeders). The compiled capture path (aot_eager)
runs a few fixed cases: compiling costs seconds per shape.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dare_pipeline.plugin_kit.invariant import Case, check_invariant
from dare_pipeline.plugin_kit.testing import tiny_model

torch.set_num_threads(1)

VOCAB = 64  # tiny_model's default: 62 is EOS and padding, 63 the mask
MASK = VOCAB - 1
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

REUSE = {"none": [],
         "dare_kv": [{"name": "dare_kv", "threshold": 0.0}],
         "dare_o": [{"name": "dare_o", "threshold": 0.0, "exempt_layers": []}],
         "ffn_reuse": [{"name": "ffn_reuse", "threshold": 0.0}],
         "dare_kv+dare_o+ffn_reuse": [{"name": "dare_kv", "threshold": 0.0}, {"name": "dare_o", "threshold": 0.0},
                                      {"name": "ffn_reuse", "threshold": 0.0}],
         "dllm_cache": [{"name": "dllm_cache", "prompt_interval": 1, "response_interval": 1}]}
WHOLE_CANVAS_ONLY = {"dllm_cache"}


@functools.cache
def _model(family: str, seed: int, n_layers: int, kv_heads: int):
    return tiny_model(family, seed=seed, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=kv_heads,
                      vocab_size=VOCAB)


@st.composite
def models(draw):
    family = draw(st.sampled_from(["llada", "dream"]))
    kv_heads = 4 if family == "llada" else draw(st.sampled_from([2, 1]))  # Dream: grouped-query attention
    return _model(family, draw(st.integers(0, 2)), draw(st.integers(1, 3)), kv_heads)


@st.composite
def cases(draw, whole_canvas: bool = False):
    lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    answer = draw(st.integers(1, 8))
    ids = st.integers(0, VOCAB - 3)
    prompts = tuple(tuple(draw(st.lists(ids, min_size=n, max_size=n))) for n in lengths)
    answers = tuple(tuple(draw(st.lists(st.one_of(ids, st.just(MASK)), min_size=answer, max_size=answer)))
                    for _ in lengths)
    length = max(lengths) + answer
    form = "whole" if whole_canvas else draw(st.sampled_from(["whole", "suffix", "block", "column"]))
    if form == "whole":
        fed = (0, length)
    elif form == "suffix":
        fed = (draw(st.integers(1, length - 1)), length)
    elif form == "block":
        start = draw(st.integers(0, length - 2))
        fed = (start, draw(st.integers(start + 1, length - 1)))
    else:
        start = draw(st.integers(0, length - 1))
        fed = (start, start + 1)
    head_rows = None
    if draw(st.booleans()):
        head_rows = tuple(sorted(draw(st.sets(st.integers(0, fed[1] - fed[0] - 1), min_size=1))))
    return Case(prompts=prompts, answers=answers, fed=fed, head_rows=head_rows)


@st.composite
def setups(draw):
    reuse = draw(st.sampled_from(sorted(REUSE)))
    return draw(models()), draw(cases(whole_canvas=reuse in WHOLE_CANVAS_ONLY)), reuse


@SETTINGS
@given(setup=setups())
def test_a_forward_over_any_rows_with_exact_caches_is_the_full_forward(setup):
    model, case, reuse = setup
    check_invariant(model, case, REUSE[reuse])


# a few shapes only: each new (batch, canvas, fed) shape compiles the forward again
COMPILED = [("llada", 1, 4, Case(((5, 6, 7), (8, 9, 10, 11, 12)), ((MASK, 3, MASK, MASK),) * 2, fed=(5, 7)), "none"),
            ("dream", 2, 2, Case(((5, 6), (8, 9, 10, 11)), ((4, MASK, 9, MASK, MASK),) * 2, fed=(4, 9)),
             "dare_kv+dare_o+ffn_reuse"),
            ("llada", 2, 4, Case(((5,), (8, 9, 10)), ((MASK, 3, MASK, MASK),) * 2, fed=(0, 7)), "dllm_cache")]


@pytest.mark.parametrize("family, n_layers, kv_heads, case, reuse", COMPILED,
                         ids=[f"{c[0]}-{c[4]}-fed{c[3].fed[0]}:{c[3].fed[1]}" for c in COMPILED])
def test_the_compiled_forward_keeps_the_invariant(family, n_layers, kv_heads, case, reuse):
    model = _model(family, 0, n_layers, kv_heads)
    result = check_invariant(model, case, REUSE[reuse], execution={"mode": "compiled", "backend": "aot_eager"})
    assert result.execution["mode"] == "compiled" and result.execution["eager_forwards"] == 0, result.execution
