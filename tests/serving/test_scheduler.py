"""The batching worker in process (golden tiny model): groups by recipe settings, a failing batch
answers 500 in JSON and the next one decodes, a request that breaks decoding fails alone, a dead
worker makes /health fail and requests get 503, and no two generations ever run at once."""

import json
import math
import threading
import time

import pytest

from dare_pipeline import Pipeline, Recipe
from dare_pipeline.serving.app import create_app
from dare_pipeline.serving.requests import Served

BODY = {"prompt": [5, 6, 7], "max_tokens": 32}
RECIPE = "recipes/baseline.yaml"


def _served(golden_models):
    return Served(name="llada", model=golden_models["llada"], recipe=Recipe.from_yaml(RECIPE), max_tokens=64)


@pytest.fixture
def app(golden_models):
    app = create_app(_served(golden_models), max_batch=8, batch_window_ms=200)
    app.state.scheduler.start()
    yield app
    app.state.scheduler.stop(timeout=10)


def _served_model(app):
    return app.state.served.model


def _alone(golden_models, ids, max_tokens=32):
    return Pipeline(golden_models["llada"], RECIPE).generate([ids], gen_length=max_tokens, steps=max_tokens).answers[0]


def _events(reply):
    lines = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_rows_batch_only_with_equal_settings(app, post_all):
    bodies = [BODY, {**BODY, "prompt": [8, 9], "n": 2}, {**BODY, "prompt": [[1, 2], [3]]}, {**BODY, "max_tokens": 64}]
    replies = post_all(app, bodies)
    sizes = [c["dare"]["batch_size"] for r in replies for c in r.json()["choices"]]
    assert sizes == [5, 5, 5, 5, 5, 1]  # the five rows of max_tokens 32 together, the 64 alone
    n_two = replies[1].json()["choices"]
    assert [c["index"] for c in n_two] == [0, 1] and n_two[0]["dare"]["token_ids"] == n_two[1]["dare"]["token_ids"]
    assert [c["index"] for c in replies[2].json()["choices"]] == [0, 1]
    assert [len(c["dare"]["token_ids"]) for c in replies[3].json()["choices"]] == [64]


def test_a_failing_batch_answers_500_json_and_the_server_goes_on(app, monkeypatch, golden_models, post_all):
    model = golden_models["llada"]
    original = model.forward_rows

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward_rows", broken)
    (reply,) = post_all(app, [BODY])
    assert reply.status_code == 500
    assert reply.json()["error"]["message"] == "decoding failed: RuntimeError: device lost"
    monkeypatch.setattr(model, "forward_rows", original)
    (reply,) = post_all(app, [BODY])
    assert reply.status_code == 200 and len(reply.json()["choices"][0]["dare"]["token_ids"]) == 32


def test_a_generation_too_large_for_the_device_is_a_400_with_the_estimate(app, monkeypatch, post_all):
    import dare_pipeline.api

    monkeypatch.setattr(dare_pipeline.api, "available_bytes", lambda device: 1024)
    replies = post_all(app, [BODY, {**BODY, "prompt": [8, 9]}])  # a batch of two, then each row alone
    for reply in replies:
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and "needs about" in error["message"]
        assert "decode fewer prompts at once or a shorter gen_length" in error["message"]


POISON = [77, 77, 77]  # a prompt the model's forward fails on, from its fifth forward on


def test_a_request_that_breaks_decoding_fails_alone(app, monkeypatch, golden_models, post_all):
    model = golden_models["llada"]
    original = model.forward_rows
    forwards_with_poison = 0

    def fragile(tokens, *args, **kwargs):  # every prompt has 3 tokens: columns 0-2 are the prompt
        nonlocal forwards_with_poison
        if (tokens[:, :3] == 77).all(dim=1).any():
            forwards_with_poison += 1
            if forwards_with_poison >= 5:
                raise RuntimeError("cannot decode the prompt 77 77 77")
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward_rows", fragile)
    prompts = [[5, 6, 7], POISON, [8, 9, 10], [11, 12, 13]]
    bodies = [{**BODY, "prompt": prompts[0]}, {**BODY, "prompt": POISON}, {**BODY, "prompt": prompts[2]},
              {**BODY, "prompt": prompts[3], "stream": True}]
    replies = post_all(app, bodies)
    assert [r.status_code for r in replies] == [200, 500, 200, 200]
    assert replies[1].json()["error"]["message"] == "decoding failed: RuntimeError: cannot decode the prompt 77 77 77"
    for i in (0, 2):
        choice = replies[i].json()["choices"][0]
        assert choice["dare"]["token_ids"] == _alone(golden_models, prompts[i]) and choice["dare"]["batch_size"] == 1
    # the stream had 4 steps from the failed batch; decoded again alone, it goes on from step 5: no
    # step twice (steps the client had not read yet arrive merged into one chunk), every position once
    events = _events(replies[3])
    assert all("error" not in e for e in events)
    steps = [e["choices"][0]["dare"]["step"] for e in events[:-1]]
    assert steps == sorted(set(steps)) and steps[-1] == 32
    positions = [p for e in events[:-1] for p in e["choices"][0]["dare"]["positions"]]
    assert sorted(positions) == list(range(32))
    assert events[-1]["choices"][0]["dare"]["token_ids"] == _alone(golden_models, prompts[3])
    # nobody sees another's error
    assert all("cannot decode" not in r.text for r in (replies[0], replies[2], replies[3]))


def test_isolated_batches_are_counted(app, monkeypatch, golden_models, post_all):
    model = golden_models["llada"]
    original = model.forward_rows

    def fragile(tokens, *args, **kwargs):
        if (tokens[:, :3] == 77).all(dim=1).any():
            raise RuntimeError("cannot decode")
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward_rows", fragile)
    post_all(app, [{**BODY, "prompt": POISON}, BODY])
    assert "dare_isolated_batches_total 1.0" in app.state.metrics.render().decode()


def test_a_dead_worker_fails_health_and_answers_503(golden_models, post_all, asgi_client):
    import asyncio

    app = create_app(_served(golden_models))

    def broken_wait():
        raise OverflowError("timeout value is too large")  # what an infinite batch window once did

    app.state.scheduler._next_batch = broken_wait
    app.state.scheduler.start()
    app.state.scheduler._thread.join(10)

    async def go():
        async with asgi_client(app) as client:
            health = await client.get("/health")
            reply = await asyncio.wait_for(client.post("/v1/completions", json=BODY), 10)
            return health, reply

    health, reply = asyncio.run(go())
    assert health.status_code == 503 and "OverflowError" in health.json()["error"]["message"]
    assert reply.status_code == 503 and "the decoding worker stopped" in reply.json()["error"]["message"]


def test_rows_queued_when_the_worker_dies_get_503(golden_models, post_all):
    app = create_app(_served(golden_models), batch_window_ms=300)
    scheduler = app.state.scheduler
    original = scheduler._next_batch
    calls = 0

    def dies_on_second_call():
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OverflowError("timeout value is too large")
        return original()

    scheduler._next_batch = dies_on_second_call
    scheduler.start()
    # two groups: whichever is submitted first decodes, the other waits and finds the worker dead
    replies = post_all(app, [BODY, {**BODY, "max_tokens": 64}], timeout=30)
    decoded, queued = sorted(replies, key=lambda r: r.status_code)
    assert decoded.status_code == 200
    assert queued.status_code == 503 and "OverflowError" in queued.json()["error"]["message"]


def test_a_failure_answering_a_decoded_batch_answers_its_requests_500_and_the_server_goes_on(app, monkeypatch,
                                                                                             post_all):
    """What runs after a batch decodes (its rows' results) fails: the batch's requests get a 500
    (not a hang), the worker lives on and decodes the next request."""
    from dare_pipeline.serving import scheduler

    original = scheduler._result

    def broken(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(scheduler, "_result", broken)
    replies = post_all(app, [BODY, {**BODY, "prompt": [8, 9]}], timeout=30)
    for reply in replies:
        assert reply.status_code == 500, reply.text
        assert reply.json()["error"]["message"].startswith("answering failed: UnicodeDecodeError")
    monkeypatch.setattr(scheduler, "_result", original)
    (reply,) = post_all(app, [BODY], timeout=30)
    assert reply.status_code == 200 and len(reply.json()["choices"][0]["dare"]["token_ids"]) == 32


def test_a_worker_that_dies_during_a_batch_answers_that_batch_503(golden_models, post_all):
    """A failure no batch survives (here in the step callback's caller, past the per-batch handling):
    the rows being decoded are answered 503 too, not left waiting."""
    app = create_app(_served(golden_models), batch_window_ms=50)
    scheduler = app.state.scheduler

    def dies(batch):
        raise SystemError("worker state lost")

    scheduler._run = dies
    scheduler.start()
    (reply,) = post_all(app, [BODY], timeout=30)
    assert reply.status_code == 503 and "SystemError: worker state lost" in reply.json()["error"]["message"]


def test_rows_of_clients_gone_hold_no_place_in_the_queue(golden_models):
    """--max-queue 2, both places taken by rows whose clients have left (a batch window of a minute, so
    nothing decodes them meanwhile): a new request is queued, not refused 429."""
    import asyncio

    from dare_pipeline.serving.requests import RequestError
    from dare_pipeline.serving.scheduler import Row

    app = create_app(_served(golden_models), max_queue=2, batch_window_ms=60_000)
    scheduler = app.state.scheduler
    scheduler.start()
    spec = _row_spec(golden_models)

    async def go():
        loop = asyncio.get_running_loop()
        gone = [Row(spec=spec, loop=loop, future=loop.create_future()) for _ in range(2)]
        scheduler.submit(gone)
        with pytest.raises(RequestError) as full:
            scheduler.submit([Row(spec=spec, loop=loop, future=loop.create_future())])
        for row in gone:
            row.cancelled = True
        scheduler.submit([Row(spec=spec, loop=loop, future=loop.create_future())])
        return full.value.status, scheduler._queued, app.state.metrics.render().decode()

    try:
        status, queued, metrics = asyncio.run(go())
    finally:
        scheduler.stop(timeout=10)
    assert status == 429 and queued == 1 and "dare_queue_depth 1.0" in metrics


def _row_spec(golden_models):
    from dare_pipeline.serving.requests import RowSpec

    recipe = _served(golden_models).recipe
    return RowSpec(index=0, ids=[5, 6, 7], recipe=recipe, key="k", seed=0)


def test_the_steps_a_slow_stream_has_not_read_merge_into_one_item(app, golden_models):
    """A streaming row whose client reads nothing until its decode ends: its queue holds one step item
    (every step merged: the last step, every position committed once, in commit order) and the end,
    not one item a step."""
    import asyncio

    from dare_pipeline.serving.scheduler import Row

    spec = _row_spec(golden_models)

    async def go():
        loop = asyncio.get_running_loop()
        row = Row(spec=spec, loop=loop, future=loop.create_future(), events=asyncio.Queue())
        app.state.scheduler.submit([row])
        result = await asyncio.wait_for(row.future, 60)
        await asyncio.sleep(0.1)  # the worker's last deliveries reach the loop
        items = [row.events.get_nowait() for _ in range(row.events.qsize())]
        return result, items, row.take_steps()

    result, items, steps = asyncio.run(go())
    assert [kind for kind, _, _ in items] == ["step", "done"]
    gen_length = spec.recipe.generation.gen_length
    assert steps["step"] == result.nfe and sorted(steps["positions"]) == list(range(gen_length))
    alone = Pipeline(golden_models["llada"], RECIPE).generate([spec.ids])
    committed_at = [alone.unmask_step[0][p] for p in steps["positions"]]
    assert committed_at == sorted(committed_at)  # in the order the steps committed them
    canvas = alone.sequences[0][len(spec.ids):]
    assert steps["token_ids"] == [canvas[p] for p in steps["positions"]]


def test_an_infinite_batch_window_is_refused_when_the_app_is_made(golden_models):
    with pytest.raises(ValueError, match="batch_window_ms = inf: expected a finite number"):
        create_app(_served(golden_models), batch_window_ms=math.inf)


def test_one_generation_at_a_time_whatever_the_requests(app, monkeypatch, golden_models, post_all):
    running, most, lock = 0, 0, threading.Lock()
    original = Pipeline.generate

    def counted(self, *args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.02)  # widen the window in which an overlap would show
            return original(self, *args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(Pipeline, "generate", counted)
    # several groups (lengths, sampling seeds), plain and streamed, all at once
    bodies = [{**BODY, "prompt": [5 + i, 6, 7], "max_tokens": 32 * (1 + i % 2), "stream": i % 3 == 0,
               "temperature": 0.5 * (i % 2), "seed": i} for i in range(12)]
    replies = post_all(app, bodies)
    assert all(r.status_code == 200 for r in replies)
    assert most == 1
    greedy = [i for i in range(12) if i % 2 == 0 and i % 3]
    for i in greedy:
        assert replies[i].json()["choices"][0]["dare"]["token_ids"] == _alone(golden_models, [5 + i, 6, 7])


def test_sampled_choices_draw_from_seed_plus_their_index_in_one_batch(app, post_all):
    """Rows of different seeds decode together (each brings its seed), each as it would alone."""
    sampled = {**BODY, "temperature": 1.0, "seed": 3}
    two, again, fourth = post_all(app, [{**sampled, "n": 2}, sampled, {**sampled, "seed": 4}])
    ids = [c["dare"]["token_ids"] for c in two.json()["choices"]]
    assert ids[0] == again.json()["choices"][0]["dare"]["token_ids"]  # same seed, same sample
    assert ids[1] == fourth.json()["choices"][0]["dare"]["token_ids"]  # choice 1 drew from seed 4
    assert ids[0] != ids[1]
    assert [c["dare"]["seed"] for c in two.json()["choices"]] == [3, 4]
    assert {c["dare"]["batch_size"] for r in (two, again, fourth) for c in r.json()["choices"]} == {4}
    alone = Pipeline(_served_model(app), RECIPE).generate([[5, 6, 7]], gen_length=32, steps=32, temperature=1.0,
                                                          seed=4)
    assert alone.answers[0] == ids[1]


def test_a_sampled_request_without_a_seed_draws_one_and_says_which(app, post_all):
    """As OpenAI's and vLLM's servers: the same unseeded sampled request twice gives two samples; the
    seed a choice reports, sent back, gives that choice again."""
    sampled = {**BODY, "temperature": 1.0}
    first, second = post_all(app, [sampled, sampled])
    seeds = [r.json()["choices"][0]["dare"]["seed"] for r in (first, second)]
    assert seeds[0] != seeds[1]
    (again,) = post_all(app, [{**sampled, "seed": seeds[1]}])
    assert again.json()["choices"][0]["dare"]["token_ids"] == second.json()["choices"][0]["dare"]["token_ids"]
    (greedy,) = post_all(app, [BODY])
    assert greedy.json()["choices"][0]["dare"]["seed"] == 0  # greedy: the recipe's seed, which changes nothing


def test_without_max_tokens_the_recipe_length_is_capped_by_the_server_limit(app, post_all):
    (reply,) = post_all(app, [{"prompt": [5, 6, 7]}])  # baseline's gen_length 256 > this server's 64
    assert reply.status_code == 200 and reply.json()["choices"][0]["dare"]["nfe"] == 64
