"""The OpenAI fields common clients send, through the official openai client (in process, the
embedded model): what LangChain's ChatOpenAI and OpenAI classes and LiteLLM put in a request by
default is accepted, `max_completion_tokens` is `max_tokens`, `stream_options.include_usage` adds
the usage chunk, `top_p` (and vLLM's `top_k`) restrict sampling, and values that would change
decoding in a way this server does not implement are refused naming the field."""

import asyncio

import httpx
import openai
import pytest

from dare_pipeline import Recipe
from dare_pipeline.serving.app import create_app
from dare_pipeline.serving.requests import Served

PROMPT = "Q: reverse pythonwizard\nA: "
MESSAGES = [{"role": "user", "content": "reverse pythonwizard"}]
ANSWER = "#### draziwnohtyp"

# langchain-openai's ChatOpenAI: model and stream, the fields it was given (None left out), and
# max_tokens renamed max_completion_tokens; streamed with stream_usage, it adds stream_options
LANGCHAIN_CHAT = {"model": "default", "stream": False, "max_completion_tokens": 64}
LANGCHAIN_CHAT_STREAM = {"model": "default", "stream": True, "stream_options": {"include_usage": True},
                         "max_completion_tokens": 64}
# langchain-openai's OpenAI (completions) sends its defaults, the None ones as null
LANGCHAIN_COMPLETION = {"model": "default", "temperature": 0.7, "top_p": 1, "frequency_penalty": 0,
                        "presence_penalty": 0, "n": 1, "logit_bias": {}, "seed": None, "logprobs": None,
                        "max_tokens": 64}
# LiteLLM passes the caller's fields through; its proxy asks streams for their usage
LITELLM_STREAM = {"model": "default", "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True},
                  "user": "team-a"}


@pytest.fixture(scope="module")
def app(default_model):
    served = Served(name="default", model=default_model, recipe=Recipe.from_yaml("recipes/baseline.yaml"),
                    max_tokens=64)
    app = create_app(served)
    app.state.scheduler.start()
    yield app
    app.state.scheduler.stop(timeout=10)


def _call(app, make):
    """make(client) with an AsyncOpenAI client on the app; a stream is read to its end."""
    async def go():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http,
                                      max_retries=0) as client:
            out = await make(client)
            return [chunk async for chunk in out] if isinstance(out, openai.AsyncStream) else out

    return asyncio.run(asyncio.wait_for(go(), 120))


def test_langchain_chat_request(app):
    out = _call(app, lambda c: c.chat.completions.create(messages=MESSAGES, **LANGCHAIN_CHAT))
    assert out.choices[0].message.content == ANSWER
    same = _call(app, lambda c: c.chat.completions.create(model="default", messages=MESSAGES, max_tokens=64))
    assert same.choices[0].message.content == ANSWER and same.usage == out.usage


@pytest.mark.parametrize("fields", [LANGCHAIN_CHAT_STREAM, LITELLM_STREAM], ids=["langchain", "litellm"])
def test_a_stream_with_include_usage_ends_with_the_usage(app, fields):
    chunks = _call(app, lambda c: c.chat.completions.create(messages=MESSAGES, **fields))
    *answer, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in answer) == ANSWER
    assert all(c.usage is None for c in answer)
    plain = _call(app, lambda c: c.chat.completions.create(model="default", messages=MESSAGES, max_tokens=64))
    assert last.choices == [] and last.usage == plain.usage and last.id == chunks[0].id


def test_a_completion_stream_with_include_usage(app):
    chunks = _call(app, lambda c: c.completions.create(model="default", prompt=PROMPT, max_tokens=64, stream=True,
                                                       stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == ANSWER
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ANSWER)


def test_a_stream_without_include_usage_has_no_usage_chunk(app):
    chunks = _call(app, lambda c: c.completions.create(model="default", prompt=PROMPT, max_tokens=64, stream=True,
                                                       stream_options={"include_usage": False}))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_langchain_completion_defaults_change_nothing(app):
    out = _call(app, lambda c: c.completions.create(prompt=[PROMPT], **LANGCHAIN_COMPLETION))
    bare = _call(app, lambda c: c.completions.create(model="default", prompt=[PROMPT], max_tokens=64, temperature=0.7))
    assert out.choices[0].text == bare.choices[0].text and out.usage == bare.usage


def test_with_greedy_decoding_any_top_p_is_accepted(app):
    out = _call(app, lambda c: c.completions.create(model="default", prompt=PROMPT, max_tokens=64, top_p=0.1))
    assert out.choices[0].text == ANSWER


@pytest.mark.parametrize("extra", [{"top_p": 0.0}, {"top_k": 1}])
def test_top_p_and_top_k_restrict_sampling(app, extra):
    """A nucleus of one token samples the most likely one: at temperature 5 the answers are the greedy
    answer whatever the seed (the embedded LLaDA-family model ranks by its own softmax), and without
    the restriction the same seeds sample other answers."""
    def answers(**fields):
        texts = set()
        for seed in (0, 10):
            out = _call(app, lambda c: c.completions.create(model="default", prompt=PROMPT, max_tokens=64, n=4,
                                                            temperature=5.0, seed=seed, **fields))
            texts |= {choice.text for choice in out.choices}
        return texts

    assert answers(**({"extra_body": extra} if "top_k" in extra else extra)) == {ANSWER}
    assert answers() != {ANSWER}


@pytest.mark.parametrize("chat, fields, param", [
    (False, {"top_p": 1.5}, "top_p"),
    (False, {"extra_body": {"top_k": -2}}, "top_k"),
    (False, {"frequency_penalty": 0.5}, "frequency_penalty"),
    (True, {"presence_penalty": -1}, "presence_penalty"),
    (False, {"logit_bias": {"9": 5}}, "logit_bias"),
    (False, {"logprobs": 0}, "logprobs"),
    (True, {"logprobs": True}, "logprobs"),
    (True, {"top_logprobs": 2}, "top_logprobs"),
    (False, {"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream: true
    (True, {"max_tokens": 32, "max_completion_tokens": 64}, "max_completion_tokens"),
    (True, {"max_completion_tokens": 5000}, "max_completion_tokens"),
    (False, {"echo": True}, "echo"),  # not implemented: unknown
    (False, {"best_of": 2}, "best_of"),
    (True, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (True, {"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
])
def test_options_this_server_cannot_honour_are_refused_by_name(app, chat, fields, param):
    fields = {"model": "default", "max_tokens": 32, **fields}
    if chat:
        call = lambda c: c.chat.completions.create(messages=MESSAGES, **fields)
    else:
        call = lambda c: c.completions.create(prompt=PROMPT, **fields)
    with pytest.raises(openai.BadRequestError) as error:
        _call(app, call)
    assert error.value.body["param"] == param and param.split(".")[-1] in error.value.body["message"]
