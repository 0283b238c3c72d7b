"""Bounded fuzzing of the server (derandomized, ~10 s): request bodies of every shape (typed
fields, wrong types, edge numbers, unknown fields, non-objects, broken JSON) to both decoding
endpoints of a live app in process, plain and streamed. Every answer is a 200 with choices (or a
well-formed event stream) or a 4xx in OpenAI's error shape, never a 5xx, and /health stays up."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from dare_pipeline import Recipe
from dare_pipeline.serving.app import create_app
from dare_pipeline.serving.requests import SAFE_OVERRIDES, Served

SETTINGS = {"deadline": None, "derandomize": True, "phases": [Phase.explicit, Phase.generate],
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture]}
ERROR_KEYS = {"message", "type", "param", "code"}

EDGE = st.sampled_from([0, 1, -1, 2, 16, 17, 64, 65, 2**31, 2**63, -(2**63), 10**30, 0.5, 1.0, 1e308, -0.0, 5e-324,
                        True, False, None, "", "32", "yes", [], {}, [1], {"a": 1}])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12), EDGE)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["Q: reverse abc\nA: ", "Q: add 3+4\nA: ", "<|mask|>",
                                                        "<|eos|>", "\x00", "A" * 3000]))
TOKEN_IDS = st.lists(st.integers(-2, 110), max_size=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXT})
# near-valid values of every field, so that most bodies reach the deeper checks and decoding
VALID = {
    "model": st.just("fuzz"), "max_tokens": st.integers(1, 17), "max_completion_tokens": st.integers(1, 17),
    "temperature": st.sampled_from([0, 0.0, 0.7, 1.5]), "top_p": st.sampled_from([1, 1.0, 0.9, 0]),
    "top_k": st.sampled_from([-1, 0, 1, 5]),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=5)),
    "seed": st.integers(0, 2**64), "n": st.integers(1, 3), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "frequency_penalty": st.sampled_from([0, 0.0]), "presence_penalty": st.sampled_from([0, 0.0]),
    "logit_bias": st.just({}), "logprobs": st.none(), "user": st.text(max_size=8),
    "recipe_overrides": st.dictionaries(st.sampled_from([*SAFE_OVERRIDES, "execution.mode"]),
                                        st.sampled_from([1, 2, 3, 4, 8, 16, 0.5, "random", "low_confidence",
                                                         "margin", "neg_entropy", "sideways"]), max_size=2),
}
completion = st.fixed_dictionaries({"prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3), TOKEN_IDS,
                                                        st.lists(TOKEN_IDS, min_size=1, max_size=3))}, optional=VALID)
chat = st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}, optional=VALID)
BROKEN = [*VALID, "prompt", "messages", "echo", "tools", "best_of", "top_logprobs"]


@st.composite
def mutated(draw, bodies):
    """A near-valid body with up to two fields set to anything (or to an unknown field)."""
    body = draw(bodies)
    for name in draw(st.lists(st.sampled_from(BROKEN), max_size=2)):
        body[name] = draw(st.one_of(EDGE, VALUES))
    return json.dumps(body).encode()


# (chat endpoint?, body): mostly near-valid bodies to their endpoint, some to the other, some garbage
requests = st.one_of(st.tuples(st.just(False), mutated(completion)), st.tuples(st.just(False), mutated(completion)),
                     st.tuples(st.just(True), mutated(chat)), st.tuples(st.just(True), mutated(chat)),
                     st.tuples(st.booleans(), mutated(completion) | mutated(chat)),
                     st.tuples(st.booleans(), VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40)
                               | mutated(completion).map(lambda b: b[:-1])))


@pytest.fixture(scope="module")
def client(default_model):
    # a short one-block recipe: the bodies that are valid decode in a few forwards
    recipe = Recipe.from_dict({"generation": {"gen_length": 16, "block_length": 16, "steps": 4}}, source="fuzz")
    app = create_app(Served(name="fuzz", model=default_model, recipe=recipe, max_tokens=16), max_batch=4,
                     batch_window_ms=0, max_queue=64)
    with TestClient(app, raise_server_exceptions=False) as client:  # runs the lifespan: the batching worker
        yield client


def _check_error(reply):
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:500])
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def _check_stream(reply):
    lines = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", reply.text[-500:]
    for line in lines[:-1]:
        assert "error" not in json.loads(line), line


@settings(max_examples=500, **SETTINGS)
@given(sent=requests)
@example(sent=(False, b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"))
@example(sent=(False, b'{"prompt": "x", "recipe_overrides": {"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"))
@example(sent=(False, b'{"prompt": "x", "temperature": 1e400}'))
@example(sent=(False, b'{"prompt": ["a", "b"], "n": 16, "max_tokens": 2}'))
@example(sent=(False, b'{"prompt": "Q: reverse abc\\nA: ", "stream": true, "stream_options": {"include_usage": true}}'))
@example(sent=(True, b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "n": 2, "max_tokens": 4}'))
@example(sent=(False, b'{"prompt": [1, 2, 3], "recipe_overrides": {"generation.block_length": 3}, "max_tokens": 7}'))
@example(sent=(False, b'{"prompt": [1, 2], "recipe_overrides": {"generation.block_length": "sideways"}}'))
def test_every_body_gets_json_2xx_or_a_4xx_error_never_5xx(client, sent):
    chat, body = sent
    reply = client.post("/v1/chat/completions" if chat else "/v1/completions", content=body)
    if reply.status_code == 200:
        if reply.headers["content-type"].startswith("text/event-stream"):
            _check_stream(reply)
        else:
            assert isinstance(reply.json()["choices"], list) and reply.json()["choices"]
    else:
        _check_error(reply)
    assert client.get("/health").json() == {"status": "ok"}
