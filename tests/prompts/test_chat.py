"""Chat prompts (lists of messages) and the embedded model's `Q: ...\\nA: ` format, with the embedded tokenizer."""

import copy

import pytest

from dare_pipeline import Pipeline, generate, load_model
from dare_pipeline.evaluation.suite import format_prompt, heldout_problems
from dare_pipeline.prompts.encode import QA_PROMPT, encode, format_hint, render

GEN = {"gen_length": 64, "block_length": 32, "steps": 64}


@pytest.fixture(scope="module")
def model():
    return load_model("default")


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_messages_decode_to_the_answer(model):
    out = generate(model, [[{"role": "user", "content": "add 3+4+5+6"}]], chat=True, **GEN)
    assert out.text == ["3+4=7,7+5=12,12+6=18\n#### 18"]
    assert out.sequences[0][: len(_ids(model.tokenizer, "Q: add 3+4+5+6\nA: "))] == _ids(
        model.tokenizer, "Q: add 3+4+5+6\nA: ")


def test_multi_turn_chat_renders_as_the_few_shot_prompt(tok):
    problem, shots = heldout_problems(1, seed=0)[0], heldout_problems(4, seed=1)[1:]
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
    messages.append({"role": "user", "content": problem["question"]})
    assert render(tok, messages, chat=True) == format_prompt(problem, shots)
    assert encode(tok, [messages]) == [_ids(tok, format_prompt(problem, shots))]


def test_a_batch_of_conversations_decodes_like_their_rendered_text(model):
    chats = [[{"role": "user", "content": "reverse pythonwizard"}],
             [{"role": "user", "content": "sort c,m,k,u,h,x,n,f"}, {"role": "assistant", "content": "#### c,f,h"},
              {"role": "user", "content": "add 2+7+6+4+3"}]]
    pipe = Pipeline(model, {"generation": GEN})
    as_chat = pipe.generate(chats, chat=True)
    as_text = pipe.generate([render(model.tokenizer, c, chat=True) for c in chats], chat=False)
    assert as_chat.sequences == as_text.sequences
    assert as_chat.text[0] == "#### draziwnohtyp"


def test_one_conversation_need_not_be_wrapped_in_a_batch(tok):
    conversation = [{"role": "user", "content": "add 2+7+6+4+3"}]
    assert encode(tok, conversation, chat=True) == encode(tok, [conversation], chat=True)


@pytest.mark.parametrize("prompt", ["add 3+4+5+6", "What is 12 + 34?", "Q: add 1+2\nA: 1+2=3"])
def test_default_wraps_text_not_in_the_qa_format(tok, prompt):
    assert not QA_PROMPT.match(prompt)
    assert encode(tok, prompt) == [_ids(tok, f"Q: {prompt}\nA: ")]
    assert encode(tok, prompt, chat=False) == [_ids(tok, prompt)]


def test_default_keeps_prompts_already_in_the_qa_format(tok):
    few_shot = format_prompt(heldout_problems(1, seed=0)[0], heldout_problems(3, seed=2))
    for prompt in ("Q: add 3+4+5+6\nA: ", few_shot):
        assert encode(tok, prompt) == [_ids(tok, prompt)]


def test_default_leaves_text_alone_for_other_chat_templates(tok):
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}<assistant>"
    assert encode(other, "add 3+4+5+6") == [_ids(tok, "add 3+4+5+6")]
    assert encode(other, "add 3+4+5+6", chat=True) == [_ids(tok, "<user>add 3+4+5+6<assistant>")]


def test_token_ids_are_never_templated(tok):
    assert encode(tok, [[7, 8, 9], [10]]) == [[7, 8, 9], [10]]


@pytest.mark.parametrize("prompts, chat, message", [
    ([[{"role": "user"}]], True, r"prompt 0, message 0: .*string 'role' and 'content'"),
    ([[{"role": "user", "content": "x"}, "add 1+2"]], None, r"prompt 0, message 1: 'add 1\+2'"),
    ([[{"role": "user", "content": "x"}]], False, r"prompt 0 is a list of chat messages"),
])
def test_bad_chat_prompts_are_clear_errors(tok, prompts, chat, message):
    with pytest.raises(ValueError, match=message):
        encode(tok, prompts, chat=chat)


def test_chat_without_a_template_is_a_clear_error(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        encode(bare, "add 3+4+5+6", chat=True, source="ckpt")
    assert encode(bare, "add 3+4+5+6") == [_ids(tok, "add 3+4+5+6")]


def test_format_hint_only_for_raw_text_outside_the_format(tok):
    assert "not in this model's prompt format 'Q: <question>\\nA: '" in format_hint(tok, "add 12+34", chat=False)
    assert format_hint(tok, "add 12+34", chat=None) is None
    assert format_hint(tok, "Q: add 1+2\nA: ", chat=False) is None
    assert format_hint(None, "add 12+34", chat=False) is None
