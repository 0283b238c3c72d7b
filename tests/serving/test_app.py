"""The server end to end, through the official openai client and raw HTTP: answers equal
`dare-pipeline generate`, 16 concurrent clients are batched and get their single answers, bad
input gets a 4xx JSON error naming the field and the server goes on, a client that leaves
mid-stream frees its batch, SIGTERM lets in-flight requests finish."""

import json
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dare_pipeline import Pipeline, load_model
from dare_pipeline.cli import main

KEY = "test-key"
PROMPT = "Q: reverse pythonwizard\nA: "
# 16 questions whose answers (at max_tokens 32) all differ, so an answer sent to the wrong client shows
QUESTIONS = [f"reverse {w}" for w in ("pythonwizard", "abc", "diffusion", "kettle", "zebra", "quantum", "lantern",
                                      "orbit", "pepper", "violet", "tundra", "walrus", "cobalt", "fjord")]
QUESTIONS += ["add 3+4+5", "add 7+8"]


@pytest.fixture(scope="module")
def server(start_server):
    # a wide window: the 16 clients' requests arrive within it and decode as one batch
    return start_server("--api-key", KEY, "--max-batch", "16", "--batch-window-ms", "500")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    return Pipeline(load_model("default"), "recipes/baseline.yaml")


def _cli_answer(capsys, prompt: str, *extra: str) -> str:
    """The answer `dare-pipeline generate` prints for max_tokens 64 (gen_length 64, steps 64)."""
    capsys.readouterr()
    assert main(["generate", prompt, "--recipe", "recipes/baseline.yaml", "--set", "generation.gen_length=64",
                 "--set", "generation.steps=64", "--no-progress", *extra]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_completion_equals_generate(client, capsys):
    expected = _cli_answer(capsys, PROMPT)
    out = client.completions.create(model="default", prompt=PROMPT, max_tokens=64)
    assert expected == "#### draziwnohtyp"
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(expected)
    assert out.model == "default" and [m.id for m in client.models.list()] == ["default"]


def test_chat_completion_equals_generate_chat(client, capsys):
    expected = _cli_answer(capsys, "reverse pythonwizard", "--chat")
    out = client.chat.completions.create(model="default", max_tokens=64,
                                         messages=[{"role": "user", "content": "reverse pythonwizard"}])
    assert out.choices[0].message.content == expected == "#### draziwnohtyp"
    assert out.choices[0].message.role == "assistant"


def test_streamed_completion_sends_each_step_and_the_same_text(client, reference):
    expected = reference.generate([PROMPT], gen_length=64, steps=64)
    chunks = list(client.completions.create(model="default", prompt=PROMPT, max_tokens=64, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text[0]
    steps = [c.choices[0].model_extra["dare"] for c in chunks[:-1]]
    # one committed token per step; steps the client had not read yet arrive merged into one chunk
    numbers = [s["step"] for s in steps]
    assert numbers == sorted(set(numbers)) and numbers[-1] == 64
    assert sum(len(s["positions"]) for s in steps) == 64
    committed = {p: t for s in steps for p, t in zip(s["positions"], s["token_ids"])}
    assert committed == dict(enumerate(expected.sequences[0][len(reference.encode(PROMPT)[0]):]))
    settled = [s["settled"] for s in steps]
    assert settled == sorted(settled) and settled[-1] == 64
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_strings_end_the_answer_plain_and_streamed(client):
    # "#### draziwnohtyp" settles as "#### dra", "#### drazi", ...: "iw" ends it at "#### draz"
    out = client.completions.create(model="default", prompt=PROMPT, max_tokens=64, stop=["iw"])
    assert out.choices[0].text == "#### draz" and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="default", prompt=PROMPT, max_tokens=64, stop="iw", stream=True)
    assert "".join(c.choices[0].text for c in chunks) == "#### draz"


def test_streamed_chat_completion(client):
    chunks = list(client.chat.completions.create(model="default", max_tokens=64, stream=True,
                                                 messages=[{"role": "user", "content": "reverse pythonwizard"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "#### draziwnohtyp"


def test_sixteen_concurrent_clients_are_batched_and_get_their_single_answers(client, reference, server):
    prompts = [f"Q: {q}\nA: " for q in QUESTIONS]
    alone = [reference.generate([p], gen_length=32, steps=32).text[0] for p in prompts]
    before = _metric(server, "dare_batch_size_count")

    def ask(prompt):
        return client.completions.create(model="default", prompt=prompt, max_tokens=32)

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert [a.choices[0].text for a in answers] == alone
    assert len(set(alone)) == len(alone)
    sizes = [a.choices[0].model_extra["dare"]["batch_size"] for a in answers]
    assert max(sizes) > 1
    assert _metric(server, "dare_batch_size_max") > 1
    assert _metric(server, "dare_batch_size_count") - before < len(prompts)  # fewer batches than requests


GOOD = {"model": "default", "prompt": PROMPT, "max_tokens": 32, "recipe_overrides": {"generation.steps": 4}}


@pytest.mark.parametrize("body, status, param", [
    (b'{"prompt": "Q: x\\nA: ", ', 400, None),  # malformed JSON
    ({**GOOD, "echo": True}, 400, "echo"),  # a field this server does not know
    ({**GOOD, "prompt": "Q: " + "a" * 2040}, 400, "prompt"),  # prompt + max_tokens longer than the model allows
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 5000}, 400, "max_tokens"),
    ({**GOOD, "recipe_overrides": {"execution.mode": "compiled"}}, 400, "recipe_overrides.execution.mode"),
    ({**GOOD, "recipe_overrides": {"generation.steps": 33}}, 400, "recipe_overrides.generation.steps"),
    ({**GOOD, "recipe_overrides": {"plugins.threshold_decoding.threshold": 0.5}}, 400,
     "recipe_overrides.plugins.threshold_decoding.threshold"),  # the recipe has no such plugin
    ({**GOOD, "prompt": [1, 2, 1000]}, 400, "prompt"),
    ({**GOOD, "prompt": [1, 4, 5]}, 400, "prompt"),  # the embedded model's mask token
    ({**GOOD, "n": 17}, 400, "n"),
    ({**GOOD, "model": "gpt-4"}, 404, "model"),
])
def test_bad_input_gets_a_json_error_naming_the_field_and_the_server_goes_on(server, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(f"{server.url}/v1/completions", content=content, headers=headers, timeout=60)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param is not None:
        assert param.split(".")[-1] in error["message"]
    good = httpx.post(f"{server.url}/v1/completions", json=GOOD, headers=headers, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["dare"]["nfe"] == 4


def test_bad_chat_message_names_its_field(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="default", messages=[{"role": "robot", "content": "hi"}])
    assert error.value.body["param"] == "messages[0].role"


def test_api_key_is_checked_everywhere_but_health(server):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.completions.create(model="default", prompt=PROMPT, max_tokens=32)
    assert error.value.body["param"] == "authorization"
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_a_client_leaving_mid_stream_frees_its_batch(server, client):
    cancelled = _metric(server, "dare_cancelled_batches_total")
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 512, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # the batch held only this request: it stops within a few steps instead of decoding 512 tokens
    for _ in range(100):
        if _metric(server, "dare_cancelled_batches_total") > cancelled:
            break
        threading.Event().wait(0.1)
    assert _metric(server, "dare_cancelled_batches_total") == cancelled + 1
    assert client.completions.create(model="default", prompt=PROMPT, max_tokens=64).choices[0].text == \
        "#### draziwnohtyp"
    assert "Traceback" not in server.output()


def test_sigterm_lets_the_request_in_flight_finish(start_server):
    server = start_server()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="default", prompt=PROMPT, max_tokens=128, stream=True)
    first = next(iter(stream))  # decoding has begun
    server.proc.send_signal(signal.SIGTERM)
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert text == "#### draziwnohtyp"
    # after uvicorn's graceful shutdown the command exits as every dare-pipeline command does on SIGTERM
    assert server.proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert "Application shutdown complete" in server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
    assert "Traceback" not in server.output()
