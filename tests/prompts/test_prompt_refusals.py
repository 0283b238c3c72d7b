"""Prompts that were taken silently: empty text (answered through the chat template by the command
line and the Python API, refused by the server: now refused by all three alike), the padding token
inside a prompt (attended to as text, unlike the padding a batch adds), chat roles no template
renders, and `chat` given as something other than True, False or None."""

from __future__ import annotations

import pytest

from dare_pipeline import Pipeline, load_model
from dare_pipeline.cli import main
from dare_pipeline.prompts import PromptError


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(load_model("default"))


def test_one_message_mapping_is_refused_rather_than_read_as_two_prompts(pipe):
    with pytest.raises(PromptError, match=r"prompts = \{'content': 'add 2\+7', 'role': 'user'\}: one mapping; a chat "
                                          r"is a list of messages"):
        pipe.generate({"role": "user", "content": "add 2+7"}, gen_length=32, steps=32)


def test_a_1d_tensor_of_token_ids_is_one_prompt(pipe):
    import torch

    ids = pipe.encode(["Q: reverse abc\nA: "])[0]
    as_list = pipe.generate([ids], gen_length=32, steps=32)
    as_tensor = pipe.generate(torch.tensor(ids), gen_length=32, steps=32)
    assert as_tensor.answers == as_list.answers and len(as_tensor.answers) == 1


def test_an_empty_text_prompt_is_refused_by_the_api_and_the_command_line(pipe, capsys):
    with pytest.raises(PromptError, match="^prompt 0 is empty: every prompt needs at least one token$"):
        pipe.generate("")
    with pytest.raises(PromptError, match="^prompt 1 is empty"):
        pipe.generate(["add 1+2", ""], chat=True)
    assert main(["generate", ""]) == 2
    assert capsys.readouterr().err == "dare-pipeline: error: prompt 0 is empty: every prompt needs at least one token\n"


def test_the_padding_token_in_a_prompt_is_refused(pipe):
    pad = pipe.model.config.pad_token_id
    with pytest.raises(PromptError, match=rf"^prompt 0: position 2 is the padding token '<\|pad\|>' \(id {pad}\); a "
                                          r"prompt cannot contain it"):
        pipe.generate([[55, 32, pad, 6]])
    with pytest.raises(PromptError, match="position 0 is the padding token"):
        pipe.generate("<|pad|>Q: add 1+2\nA: ", chat=False)


def test_a_pad_id_that_is_also_eos_is_taken_as_eos(pipe):
    import attrs

    from dare_pipeline.prompts.check import check_token_ids
    cfg = attrs.evolve(pipe.model.config, pad_token_id=pipe.model.config.eos_token_id)
    check_token_ids([[55, cfg.eos_token_id, 6]], cfg)  # no error: a chat template may put eos in a prompt


def test_an_unknown_chat_role_is_refused(pipe):
    with pytest.raises(PromptError, match=r"^prompt 0, message 1: role = 'wizard': allowed roles: "
                                          r"\['system', 'user', 'assistant'\]$"):
        pipe.generate([[{"role": "user", "content": "add 1+2"}, {"role": "wizard", "content": "hi"}]])


@pytest.mark.parametrize("chat", ["yes", "no", 1, 0])
def test_chat_is_true_false_or_none(pipe, chat):
    with pytest.raises(TypeError, match=rf"^chat = {chat!r}: expected True, False or None$"):
        pipe.generate("add 1+2", chat=chat)
