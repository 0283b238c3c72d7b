"""Generations started at the same time on one model (threads, open streams) run one after another:
a stream sees only its own steps, and no answer changes because another call runs."""

import threading

import pytest

from dare_pipeline import Pipeline, load_model
from dare_pipeline.api import PipelineBusy

PROMPTS = ["Q: reverse pythonwizard\nA: ", "Q: sort d,b,c,a\nA: ", "Q: add 2+7+6\nA: "]
SHORT = {"gen_length": 64, "steps": 64}


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def test_an_interruption_right_after_the_model_is_taken_leaves_it_free(model, monkeypatch):
    """KeyboardInterrupt between taking the model's lock and the generation (here: as its owner is
    noted): the lock is released, and the next generation runs instead of waiting for ever."""
    from dare_pipeline import api

    class Interrupting(dict):
        def __setitem__(self, key, value):
            raise KeyboardInterrupt

    monkeypatch.setattr(api._TURNS, "_owners", Interrupting())
    with pytest.raises(KeyboardInterrupt):
        Pipeline(model).generate(PROMPTS[:1], **SHORT)
    monkeypatch.undo()
    done = []
    worker = threading.Thread(target=lambda: done.append(Pipeline(model).generate(PROMPTS[:1], **SHORT)))
    worker.start()
    worker.join(60)
    assert done and done[0].text == ["#### draziwnohtyp"]


class Lockstep:
    """Step callbacks for two generations that take turns step by step while both run. Where the
    generations cannot run at once, the first wait ends after `timeout` and nobody waits again."""

    def __init__(self, timeout: float = 1.0):
        self.cond = threading.Condition()
        self.steps = [0, 0]
        self.done = [False, False]
        self.timeout = timeout
        self.gave_up = False

    def callback(self, me: int):
        def on_step(event):
            with self.cond:
                self.steps[me] += 1
                self.cond.notify_all()
                other = 1 - me
                if not self.gave_up and not self.cond.wait_for(
                        lambda: self.steps[other] >= self.steps[me] or self.done[other], self.timeout):
                    self.gave_up = True
        return on_step

    def finished(self, me: int) -> None:
        with self.cond:
            self.done[me] = True
            self.cond.notify_all()


def _in_threads(*calls):
    """Run each call in its own thread at once; their results (an exception is re-raised)."""
    results, errors = [None] * len(calls), []

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as error:  # noqa: BLE001 -- re-raised in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def _events_match(events, out):
    """The events are exactly this generation's steps: one per forward, every answer position once,
    at the step that committed it, with its final token."""
    assert [e.step for e in events] == list(range(1, out.stats.nfe + 1))
    assert all(len(e.prompts) == len(out.answers) for e in events)
    for b, unmask in enumerate(out.unmask_step):
        answer = out.sequences[b][len(out.sequences[b]) - len(unmask):]
        seen = {}
        for event in events:
            p = event.prompts[b]
            for position, token in zip(p.positions, p.token_ids):
                assert position not in seen
                seen[position] = (event.step, token)
        assert seen == {i: (unmask[i], answer[i]) for i in range(len(answer))}


def test_an_open_stream_never_receives_another_generations_steps(model):
    pipe = Pipeline(model, "recipes/baseline.yaml")
    stream = pipe.stream(PROMPTS[:1], **SHORT)
    received = []
    consumer = threading.Thread(target=lambda: received.extend(stream))
    consumer.start()
    waited = threading.Event()

    def wait_for_the_stream(event):  # at its first step, give the stream up to 1 s to decode alongside
        if not waited.is_set():
            for _ in range(100):
                if received:
                    break
                waited.wait(0.01)
            waited.set()

    other = pipe.generate(PROMPTS[1:], step_callback=wait_for_the_stream, **SHORT)
    consumer.join(timeout=120)
    _events_match(received, stream.output)
    assert other.sequences == pipe.generate(PROMPTS[1:], **SHORT).sequences


def test_two_interleaved_streams_each_get_their_own_steps(model):
    pipe = Pipeline(model, "recipes/threshold.yaml")
    first, second = pipe.stream(PROMPTS[:1], **SHORT), pipe.stream(PROMPTS[1:], **SHORT)
    events = {0: [], 1: []}
    iterators = {0: iter(first), 1: iter(second)}
    while iterators:  # one event of each in turn, as a client showing both would read them
        for k in list(iterators):
            try:
                events[k].append(next(iterators[k]))
            except StopIteration:
                del iterators[k]
    _events_match(events[0], first.output)
    _events_match(events[1], second.output)
    assert first.output.sequences == pipe.generate(PROMPTS[:1], **SHORT).sequences
    assert second.output.sequences == pipe.generate(PROMPTS[1:], **SHORT).sequences


def test_a_concurrent_generation_does_not_change_a_dllm_cache_answer(model):
    pipe = Pipeline(model, "recipes/dllm_cache.yaml")
    alone = [pipe.generate([p], **SHORT).sequences for p in PROMPTS[:2]]
    steps = Lockstep()

    def call(i):
        def run():
            try:
                return pipe.generate([PROMPTS[i]], step_callback=steps.callback(i), **SHORT).sequences
            finally:
                steps.finished(i)
        return run

    assert _in_threads(call(0), call(1)) == alone


def test_two_pipelines_on_one_model_take_turns(model):
    """The executor (its per-generation counters, in cuda_graphs mode its activation stores) is the
    model's: pipelines sharing a model run one generation at a time, in whichever order they come."""
    pipes = [Pipeline(model, "recipes/baseline.yaml"), Pipeline(model, "recipes/dllm_cache.yaml")]
    alone = [pipe.generate([p], **SHORT).sequences for pipe, p in zip(pipes, PROMPTS)]
    order, steps = [], Lockstep()

    def call(i):
        def run():
            def on_step(event):
                order.append(i)
                steps.callback(i)(event)
            try:
                return pipes[i].generate([PROMPTS[i]], step_callback=on_step, **SHORT).sequences
            finally:
                steps.finished(i)
        return run

    assert _in_threads(call(0), call(1)) == alone
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches == 1, f"the two generations' steps interleaved: {order}"


def test_a_generation_started_inside_another_on_the_same_model_is_refused(model):
    pipe = Pipeline(model, "recipes/baseline.yaml")
    other = Pipeline(model, "recipes/threshold.yaml")

    def nested(event):
        if event.step == 2:
            other.generate(PROMPTS[:1], **SHORT)

    with pytest.raises(PipelineBusy, match="already generating in this thread"):
        pipe.generate(PROMPTS[:1], step_callback=nested, **SHORT)
    # the refused call left nothing behind: the model takes the next generation
    assert len(pipe.manager.get_plugins()) == 1
    assert other.generate(PROMPTS[:1], **SHORT).sequences == Pipeline(model, "recipes/threshold.yaml").generate(
        PROMPTS[:1], **SHORT).sequences


def test_closing_a_stream_that_waits_for_its_turn_returns_at_once(model):
    pipe = Pipeline(model, "recipes/baseline.yaml")
    release, holding = threading.Event(), threading.Event()

    def hold(event):
        holding.set()
        release.wait(timeout=60)

    runner = threading.Thread(target=lambda: pipe.generate(PROMPTS[:1], step_callback=hold, **SHORT))
    runner.start()
    assert holding.wait(timeout=60)
    waiting = pipe.stream(PROMPTS[1:], **SHORT)
    closer = threading.Thread(target=waiting.close)
    closer.start()
    closer.join(timeout=5)
    closed_in_time = not closer.is_alive()
    release.set()
    runner.join(timeout=120)
    closer.join(timeout=120)
    assert closed_in_time, "close() waited for the other generation to finish"
    assert waiting.output is None
