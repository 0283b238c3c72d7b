"""Step callbacks and Pipeline.stream: events describe exactly the commits, change no token, at batch > 1."""

import gc
import itertools

import pytest

from dare_pipeline import Pipeline, load_model
from dare_pipeline.core.streaming import StepEvent

PROMPTS = ["Q: reverse pythonwizard\nA: ", "Q: sort d,b,c,a\nA: ", "Q: add 2+7+6\nA: "]
SHORT = {"gen_length": 64, "steps": 64}  # two blocks: the answers settle in the first


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(load_model("default"), "recipes/baseline.yaml")


@pytest.fixture(scope="module")
def plain(pipe):
    return pipe.generate(PROMPTS, **SHORT)


def _check_events_match(events, out, prompt_lengths):
    """Every answer position is reported once, at the step that committed it, with its final token."""
    assert [e.step for e in events] == list(range(1, out.stats.nfe + 1))
    for b, (sequence, unmask) in enumerate(zip(out.sequences, out.unmask_step)):
        answer = sequence[prompt_lengths[b]:]
        seen = {}
        for event in events:
            p = event.prompts[b]
            assert list(p.positions) == sorted(p.positions)
            for position, token in zip(p.positions, p.token_ids):
                assert position not in seen
                seen[position] = (event.step, token)
        assert seen == {i: (unmask[i], answer[i]) for i in range(len(answer))}


def test_callback_reports_every_commit_and_changes_no_token(pipe, plain):
    events = []
    out = pipe.generate(PROMPTS, step_callback=events.append, **SHORT)
    assert out.sequences == plain.sequences and out.text == plain.text and out.unmask_step == plain.unmask_step
    assert all(isinstance(e, StepEvent) and len(e.prompts) == len(PROMPTS) for e in events)
    _check_events_match(events, out, [len(p) for p in pipe.encode(PROMPTS)])


def test_settled_text_only_grows_and_ends_as_the_answer(pipe, plain):
    stream = pipe.stream(PROMPTS, **SHORT)
    events = list(stream)
    assert stream.output.sequences == plain.sequences and stream.output.text == plain.text
    for b in range(len(PROMPTS)):
        texts = [e.prompts[b].text for e in events]
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
        settled = [e.prompts[b].settled for e in events]
        assert settled == sorted(settled) and settled[-1] == SHORT["gen_length"]
        first_final = next(i for i, e in enumerate(events) if e.prompts[b].finished)
        # once finished, the text is the answer and stays it
        assert {e.prompts[b].text for e in events[first_final:]} == {plain.text[b]}
        assert all(not e.prompts[b].finished for e in events[:first_final])
    # the answers settle when the first block is done (the rest is end-of-text)
    assert plain.text[0] == "#### draziwnohtyp" and events[31].prompts[0].finished


def test_a_stop_string_is_held_back_until_it_is_decided(pipe):
    # "#### draziwnohtyp" settles as "#### draz", "#### drazi", "#### draziwnoht", ...: at "#### drazi"
    # the "i" may begin the stop string "iw", so it is held back; the answer stops at "#### draz"
    stop = ("iw",)
    out = pipe.generate(PROMPTS[:1], stop=stop, **SHORT)
    assert out.text == ["#### draz"]
    events = list(pipe.stream(PROMPTS[:1], stop=stop, **SHORT))
    texts = [e.prompts[0].text for e in events]
    assert texts[-1] == "#### draz" and all("#### draz".startswith(t) for t in texts)
    finished_at = next(i for i, e in enumerate(events) if e.prompts[0].finished)
    assert events[finished_at].prompts[0].settled > len("#### draz")  # decided only when "iw" was settled


def test_the_earliest_stop_string_ends_the_answer_whichever_is_listed_first(pipe):
    """'#### draziwnohtyp' with the overlapping stop strings 'iw' and 'ziw': 'ziw' begins first, so the
    answer is '#### dra' from generate and from the stream alike (cut at 'iw' first, the text no longer
    held 'ziw' and was '#### draz')."""
    stop = ("iw", "ziw")
    assert pipe.generate(PROMPTS[:1], stop=stop, **SHORT).text == ["#### dra"]
    assert list(pipe.stream(PROMPTS[:1], stop=stop, **SHORT))[-1].prompts[0].text == "#### dra"


def test_closing_a_stream_stops_the_generation_and_the_pipeline_goes_on(pipe, plain):
    stream = pipe.stream(PROMPTS, **SHORT)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert stream.output is None
    assert len(pipe.manager.get_plugins()) == 1  # the reporter is gone, only the decoding policy is left
    assert pipe.generate(PROMPTS, **SHORT).sequences == plain.sequences


def test_dropping_a_stream_stops_its_generation(pipe):
    stream = pipe.stream(PROMPTS[:1], gen_length=1024, steps=1024)
    events = iter(stream)
    next(events)
    thread = stream._thread
    del stream, events
    gc.collect()
    thread.join(timeout=30)  # decoding all 1024 steps would take minutes on one thread
    assert not thread.is_alive()


def test_a_raising_callback_aborts_the_generation(pipe, plain):
    def fail(event):
        if event.step == 3:
            raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        pipe.generate(PROMPTS, step_callback=fail, **SHORT)
    assert pipe.generate(PROMPTS, **SHORT).sequences == plain.sequences


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_token_ids_without_tokenizer(golden_models, family):
    pipe = Pipeline(golden_models[family], "recipes/threshold.yaml")
    prompts = [[5, 6, 7], [8, 9]]
    plain = pipe.generate(prompts, **SHORT)
    stream = pipe.stream(prompts, **SHORT)
    events = list(stream)
    assert stream.output.sequences == plain.sequences
    assert all(p.text is None for e in events for p in e.prompts)
    _check_events_match(events, stream.output, [3, 2])
