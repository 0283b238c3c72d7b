"""The batching worker in process (golden tiny model): groups by recipe settings, a failing batch
answers 500 in JSON and the next one decodes."""

import asyncio

import httpx
import pytest

from dare_pipeline import Recipe
from dare_pipeline.serving.app import create_app
from dare_pipeline.serving.requests import Served

BODY = {"prompt": [5, 6, 7], "max_tokens": 32}


@pytest.fixture
def app(golden_models):
    served = Served(name="llada", model=golden_models["llada"], recipe=Recipe.from_yaml("recipes/baseline.yaml"),
                    max_tokens=64)
    app = create_app(served, max_batch=8, batch_window_ms=200)
    app.state.scheduler.start()
    yield app
    app.state.scheduler.stop(timeout=10)


def _post_all(app, bodies):
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a server logs, then answers 500
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    return asyncio.run(go())


def test_rows_batch_only_with_equal_settings(app):
    bodies = [BODY, {**BODY, "prompt": [8, 9], "n": 2}, {**BODY, "prompt": [[1, 2], [3]]}, {**BODY, "max_tokens": 64}]
    replies = _post_all(app, bodies)
    sizes = [c["dare"]["batch_size"] for r in replies for c in r.json()["choices"]]
    assert sizes == [5, 5, 5, 5, 5, 1]  # the five rows of max_tokens 32 together, the 64 alone
    n_two = replies[1].json()["choices"]
    assert [c["index"] for c in n_two] == [0, 1] and n_two[0]["dare"]["token_ids"] == n_two[1]["dare"]["token_ids"]
    assert [c["index"] for c in replies[2].json()["choices"]] == [0, 1]
    assert [len(c["dare"]["token_ids"]) for c in replies[3].json()["choices"]] == [64]


def test_a_failing_batch_answers_500_json_and_the_server_goes_on(app, monkeypatch, golden_models):
    model = golden_models["llada"]
    original = model.forward_rows

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward_rows", broken)
    (reply,) = _post_all(app, [BODY])
    assert reply.status_code == 500
    assert reply.json()["error"]["message"] == "decoding failed: RuntimeError: device lost"
    monkeypatch.setattr(model, "forward_rows", original)
    (reply,) = _post_all(app, [BODY])
    assert reply.status_code == 200 and len(reply.json()["choices"][0]["dare"]["token_ids"]) == 32


def test_sampled_choices_draw_from_seed_plus_their_index(app):
    sampled = {**BODY, "temperature": 1.0, "seed": 3}
    two, again, fourth = _post_all(app, [{**sampled, "n": 2}, sampled, {**sampled, "seed": 4}])
    ids = [c["dare"]["token_ids"] for c in two.json()["choices"]]
    assert ids[0] == again.json()["choices"][0]["dare"]["token_ids"]  # same seed, same sample
    assert ids[1] == fourth.json()["choices"][0]["dare"]["token_ids"]  # choice 1 drew from seed 4
    assert ids[0] != ids[1]


def test_without_max_tokens_the_recipe_length_is_capped_by_the_server_limit(app):
    (reply,) = _post_all(app, [{"prompt": [5, 6, 7]}])  # baseline's gen_length 256 > this server's 64
    assert reply.status_code == 200 and reply.json()["choices"][0]["dare"]["nfe"] == 64
