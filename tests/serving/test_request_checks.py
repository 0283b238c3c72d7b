"""Request bodies in process (the embedded model): JSON types are exact, over-long numbers, deep
nesting and non-JSON constants are 400s naming what is wrong, errors name the field they come
from, limits are checked before heavy work, and the docs pages need the API key."""

import json

import pytest

from dare_pipeline import Recipe
from dare_pipeline.serving import app as app_module
from dare_pipeline.serving.app import create_app
from dare_pipeline.serving.requests import Served

PROMPT = "Q: reverse abc\nA: "
GOOD = {"prompt": PROMPT, "max_tokens": 32, "recipe_overrides": {"generation.steps": 4}}
KEY = "k3y"


@pytest.fixture(scope="module")
def app(default_model):
    served = Served(name="default", model=default_model, recipe=Recipe.from_yaml("recipes/baseline.yaml"),
                    max_tokens=64)
    app = create_app(served, api_key=KEY)
    app.state.scheduler.start()
    yield app
    app.state.scheduler.stop(timeout=10)


def _post(post_all, app, body, path="/v1/completions"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    (reply,) = post_all(app, [content], path=path, authorization=f"Bearer {KEY}")
    return reply


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "32"), ("max_tokens", True), ("max_tokens", 32.0), ("n", "2"), ("stream", "yes"),
    ("stream", 1), ("temperature", True), ("temperature", "0.5"), ("seed", "7"), ("stop", 5), ("user", 5),
    ("model", 1), ("recipe_overrides", [])])
def test_json_types_are_exact(app, post_all, field, value):
    reply = _post(post_all, app, {**GOOD, field: value})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field} = {json.dumps(value)}: ")


def test_json_types_are_exact_inside_messages(app, post_all):
    reply = _post(post_all, app, {"messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages[0].content"


@pytest.mark.parametrize("raw, reason", [
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", "a number has more than 4,300 digits"),
    (b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", "a number has more than 4,300 digits"),
    (b'{"prompt": "x", "recipe_overrides": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nested deeper"),
    (b'{"prompt": "x", "recipe_overrides": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}", "nested deeper than 32"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON value"),
    (b'{"prompt": "x", "temperature": -Infinity}', "-Infinity is not a JSON value"),
    (b'{"prompt": "x"', "Expecting"),
    (b"{\"prompt\": \"\xff\"}", "can't decode byte 0xff"),
    (b"[1, 2]", "must be a JSON object, got list"),
])
def test_bodies_that_are_not_json_we_take_are_400(app, post_all, raw, reason):
    reply = _post(post_all, app, raw)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "invalid_json" and reason in error["message"] and len(error["message"]) < 300


@pytest.mark.parametrize("raw, path, param", [
    (b'{"prompt": "Q: a\\ud800b\\nA: ", "max_tokens": 32}', "/v1/completions", "prompt"),
    (b'{"prompt": ["Q: a\\nA: ", "\\udfff"], "max_tokens": 32}', "/v1/completions", "prompt[1]"),
    (b'{"messages": [{"role": "user", "content": "x\\ud83d"}]}', "/v1/chat/completions", "messages[0].content"),
    (b'{"prompt": "x", "\\ud800": 1}', "/v1/completions", None),  # an unknown field, echoed in the error
    (b'{"prompt": "x", "recipe_overrides": {"\\udfff": 1}}', "/v1/completions", "recipe_overrides.\udfff"),
])
def test_text_that_is_not_valid_unicode_is_a_400_naming_where_it_is(app, post_all, raw, path, param):
    """JSON's escapes can carry lone surrogates, which no tokenizer takes and UTF-8 cannot encode:
    a 400 naming the prompt, message or field (the error escapes what it echoes), never a 500."""
    reply = _post(post_all, app, raw, path)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    if param is not None:
        assert error["param"] == param
        assert "not valid Unicode text: a lone surrogate" in error["message"] or "\udfff" in error["message"]


def test_messages_the_chat_template_refuses_are_a_400(app, post_all, monkeypatch):
    from jinja2 import TemplateError

    tokenizer = app.state.served.model.tokenizer

    def refuses(*args, **kwargs):
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(tokenizer, "apply_chat_template", refuses)
    reply = _post(post_all, app, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                  "/v1/chat/completions")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert "chat template refuses them: Conversation roles must alternate" in reply.json()["error"]["message"]


def test_a_stop_string_longer_than_256_characters_is_refused(app, post_all):
    assert _post(post_all, app, {**GOOD, "stop": ["x" * 256]}).status_code == 200
    reply = _post(post_all, app, {**GOOD, "stop": ["\n", "x" * 257]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop"
    assert "at most 4 non-empty strings of at most 256 characters" in reply.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_the_tokens_through_the_one_that_completes_a_stop_string(app, post_all, stream):
    """The embedded tokenizer writes one character a token: '#### draziwnohtyp' cut at the stop string
    'wn' is '#### drazi', and its tokens are those through 'n' (12), not the 17 of the whole answer."""
    body = {"prompt": "Q: reverse pythonwizard\nA: ", "max_tokens": 64, "stop": ["wn"], "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    reply = _post(post_all, app, body)
    assert reply.status_code == 200, reply.text
    if stream:
        chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        usage = chunks[-1]["usage"]
        ids = next(c["choices"][0]["dare"]["token_ids"] for c in chunks
                   if c["choices"] and c["choices"][0]["finish_reason"])
    else:
        choice = reply.json()["choices"][0]
        text, usage, ids = choice["text"], reply.json()["usage"], choice["dare"]["token_ids"]
    assert text == "#### drazi"
    assert usage["completion_tokens"] == len(ids) == 12
    assert app.state.served.model.tokenizer.decode(ids) == "#### draziwn"


@pytest.mark.parametrize("temperature", [1e400, -1.0, -1e-300])
def test_a_bad_temperature_is_reported_as_temperature(app, post_all, temperature):
    raw = json.dumps({**GOOD, "temperature": 0.5}).replace("0.5", repr(temperature).replace("inf", "1e400"))
    reply = _post(post_all, app, raw.encode())
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "temperature"


def test_a_recipe_error_names_the_override_it_comes_from(app, post_all):
    overrides = {"generation.steps": 4, "generation.remasking": "sideways"}
    reply = _post(post_all, app, {**GOOD, "temperature": 0.5, "recipe_overrides": overrides})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "recipe_overrides.generation.remasking"


@pytest.mark.parametrize("block_length", ["sideways", True, 0, 2.5])
def test_a_block_length_override_must_be_a_count(app, post_all, block_length):
    reply = _post(post_all, app, {**GOOD, "recipe_overrides": {"generation.block_length": block_length}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "recipe_overrides.generation.block_length"


def test_a_request_that_can_never_fit_the_queue_says_so(app, post_all):
    reply = _post(post_all, app, {**GOOD, "prompt": [PROMPT] * 64, "n": 16})  # 1,024 rows; --max-queue 256
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "too_many_rows" and "can never fit" in error["message"] and error["param"] == "n"


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(app, post_all, monkeypatch):
    tokenizer = app.state.served.model.tokenizer
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized"))
    reply = _post(post_all, app, {**GOOD, "prompt": "a" * 500_000})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and "500,000 characters cannot fit" in error["message"]


def test_tokenizing_stops_at_the_first_prompt_too_long(app, post_all, monkeypatch):
    tokenizer = app.state.served.model.tokenizer
    original, calls = type(tokenizer).__call__, []
    monkeypatch.setattr(type(tokenizer), "__call__",
                        lambda self, text, **k: calls.append(1) or original(self, text, **k))
    long = "Q: " + "a" * 2100  # fewer characters than the bound, more tokens than the context
    reply = _post(post_all, app, {**GOOD, "prompt": [long] * 64})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    assert len(calls) == 1


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models"])
def test_every_endpoint_but_health_needs_the_key(app, asgi_client, path):
    import asyncio

    async def go():
        async with asgi_client(app) as anonymous, asgi_client(app, authorization=f"Bearer {KEY}") as known, \
                asgi_client(app, authorization=f"Bearer {KEY}x") as wrong:
            return [(await c.get(path)).status_code for c in (anonymous, wrong, known)] + \
                [(await anonymous.get("/health")).status_code]

    assert asyncio.run(go()) == [401, 401, 200, 200]


def test_the_key_is_compared_in_constant_time(app, asgi_client, monkeypatch):
    import asyncio

    seen = []
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or a == b)

    async def go():
        async with asgi_client(app, authorization="Bearer guess") as client:
            return (await client.get("/v1/models")).status_code

    assert asyncio.run(go()) == 401 and seen == [(b"Bearer guess", f"Bearer {KEY}".encode())]
