"""A generation's memory is estimated before anything is allocated: one that cannot fit in the
device's available memory fails with the estimate, by part, instead of growing until it is killed."""

from __future__ import annotations

import pytest

import dare_pipeline.api as api
from dare_pipeline import Pipeline, load_model
from dare_pipeline.api import GenerationTooLarge
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.core.registry import registered
from dare_pipeline.models.memory import available_bytes, generation_bytes, parameter_count


class StartSpy(Plugin):
    """Counts generations that started (and so allocated their canvas and store)."""

    name = "start_spy"
    started = 0

    @hookimpl
    def dare_generation_start(self, state):
        StartSpy.started += 1


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def test_a_generation_that_cannot_fit_fails_with_its_estimate_before_it_starts(model, monkeypatch):
    with registered(StartSpy):
        pipe = Pipeline(model, {"plugins": ["dllm_cache", "start_spy"]})
    monkeypatch.setattr(api, "available_bytes", lambda device: 256 << 20)  # a 256 MiB machine
    StartSpy.started = 0
    with pytest.raises(GenerationTooLarge) as caught:
        pipe.generate(["Q: add 1+2\nA: "] * 64, gen_length=1024, steps=1024)
    assert StartSpy.started == 0
    message = str(caught.value)
    assert message.startswith("a generation of 64 prompts x 1038 columns (longest prompt 14 + gen_length 1024) "
                              "needs about ")
    assert "(activation store " in message and ", logits " in message and ", layer activations " in message
    assert message.endswith("but cpu has 256.0 MiB available (the weights, already loaded, take 8.6 MiB); decode "
                            "fewer prompts at once or a shorter gen_length")
    assert pipe.generate(["Q: add 1+2\nA: "], gen_length=32, steps=32).text  # a small one still runs


def test_one_no_machine_holds_is_refused_without_patching(model):
    pipe = Pipeline(model, "recipes/baseline.yaml")
    with pytest.raises(GenerationTooLarge, match=r"a generation of 100000 prompts x 2048 columns"):
        pipe.generate([[5, 6, 7, 8]] * 100_000, gen_length=2044, steps=2044, block_length=4)


def test_the_store_is_counted_only_for_plugins_that_keep_one(model):
    sizes = dict(batch=8, model_batch=8, length=1024, block_length=32, temperature=0.0)
    plain = generation_bytes(model.config, model.dtype, store=False, fields=0, **sizes)
    cached = generation_bytes(model.config, model.dtype, store=True, fields=2, **sizes)
    assert "activation store" not in plain and cached["activation store"] > 0
    cfg = model.config
    kv = 2 * cfg.n_layers * 8 * 1024 * cfg.d_model * 4  # n_kv_heads * head_dim = d_model in this model
    assert kv < cached["activation store"] < 2.1 * kv


@pytest.mark.parametrize("plugins", [["dual_cache"], ["dare_kv"], ["dare_o"], ["dllm_cache"],
                                     ["dare_kv", "dare_o", "ffn_reuse"], ["dual_cache", "dare_o", "ffn_reuse"]])
def test_the_store_estimate_counts_the_fields_each_plugin_keeps(model, plugins, monkeypatch):
    """The estimate of a stack's activation store is the store the generation made, within 1 %: every
    reuse plugin's query reference and reused outputs count (three stacked plugins keep five
    d_model-wide fields a layer; a guess of two fell 1.8x short)."""
    pipe = Pipeline(model, {"plugins": plugins})
    made = []
    new_store = model.new_store
    monkeypatch.setattr(model, "new_store", lambda batch, length: made.append(new_store(batch, length)) or made[-1])
    prompts = ["Q: add 2+7\nA: ", "Q: reverse abc\nA: "]
    pipe.generate(prompts, gen_length=32, steps=32)
    store = made[0]
    estimate = generation_bytes(model.config, model.dtype, batch=2, model_batch=2, length=store.length,
                                block_length=32, store=True, fields=api._store_fields(pipe.plugins),
                                temperature=0.0)["activation store"]
    assert estimate == pytest.approx(store.nbytes(), rel=0.01)


def test_the_parameter_count_is_the_models(model):
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    golden = load_model("tests/data/golden/dream")  # GQA, biases
    assert parameter_count(golden.config) == sum(p.numel() for p in golden.parameters())


def test_available_memory_is_read_on_the_cpu():
    available = available_bytes("cpu")
    assert available is not None and 0 < available


def test_the_sampling_filters_are_counted_where_they_apply(model, monkeypatch):
    sizes = dict(batch=8, model_batch=8, length=1024, block_length=32, store=False, fields=0, temperature=0.7)
    plain, filtered = (generation_bytes(model.config, model.dtype, filtered=f, **sizes) for f in (False, True))
    assert filtered["logits"] - plain["logits"] == 8 * 32 * model.config.embedding_size * (32 + 4)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["filtered"])
        return generation_bytes(*args, **kwargs)

    monkeypatch.setattr(api, "generation_bytes", spy)
    pipe = Pipeline(model, "recipes/baseline.yaml")
    for settings in ({}, {"top_p": 0.9}, {"top_p": 0.9, "temperature": 0.5}, {"top_k": 3, "temperature": 0.5}):
        pipe.generate(["Q: add 1+2\nA: "], gen_length=8, steps=8, block_length=8, **settings)
    # the embedded model is of the LLaDA family: at temperature 0 it takes the argmax, filtered or not
    assert seen == [False, False, True, True]
