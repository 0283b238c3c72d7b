"""The server with a guided-diffusion recipe: answers equal Pipeline.generate's, plain and streamed
(a stream of a few steps: the guide commits runs of drafts, the early stop the EOS tail)."""

import openai
import pytest

from dare_pipeline import Pipeline, load_model

PROMPT = "Q: reverse pythonwizard\nA: "
RECIPE = "recipes/guided_dual_cache.yaml"


@pytest.fixture(scope="module")
def client(start_server):
    server = start_server("--recipe", RECIPE)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected():
    return Pipeline(load_model("default"), RECIPE).generate([PROMPT], gen_length=64, steps=64)


def test_completion_equals_generate(client, expected):
    out = client.completions.create(model="default", prompt=PROMPT, max_tokens=64)
    assert out.choices[0].text == expected.text[0] == "#### draziwnohtyp"


def test_streamed_completion_sends_each_step(client, expected):
    chunks = list(client.completions.create(model="default", prompt=PROMPT, max_tokens=64, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text[0]
    steps = [c.choices[0].model_extra["dare"] for c in chunks[:-1]]
    numbers = [s["step"] for s in steps]  # steps not read yet arrive merged
    assert numbers == sorted(set(numbers)) and numbers[-1] == expected.stats.nfe < 4
    assert sorted(p for s in steps for p in s["positions"]) == list(range(64))
