"""Prompts the model cannot take are refused before decoding, naming the prompt, the position and
what is allowed: ids that are negative, beyond the vocabulary or in the embedding's unused rows,
mask tokens (as ids or as text such as <|mask|>), text that is not UTF-8, values that are not ids."""

from __future__ import annotations

import pytest

from dare_pipeline import Pipeline, load_model
from dare_pipeline.cli import main
from dare_pipeline.prompts.check import PromptError

GOLDEN = {"generation": {"gen_length": 32, "block_length": 16, "steps": 32}}


@pytest.fixture(scope="module")
def default_pipe():
    return Pipeline(load_model("default"), GOLDEN)


@pytest.fixture(scope="module")
def golden_pipes(golden_models):
    return {family: Pipeline(model, GOLDEN) for family, model in golden_models.items()}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("token", [-1, -512, 512, 10**9])
def test_ids_outside_the_vocabulary(golden_pipes, family, token):
    with pytest.raises(PromptError, match=rf"prompt 1: token id {token} at position 2 is out of range: allowed 0 to "
                                          r"511 \(the model's vocab_size 512\)"):
        golden_pipes[family].generate([[1, 2], [3, 4, token]])


@pytest.mark.parametrize("token", [101, 127])
def test_ids_in_the_unused_rows_between_vocab_size_and_embedding_size(default_pipe, token):
    assert default_pipe.model.config.vocab_size == 101 and default_pipe.model.config.embedding_size == 128
    with pytest.raises(PromptError, match=rf"token id {token} .* allowed 0 to 100 .*; ids 101 to 127 are unused rows "
                                          r"of the embedding"):
        default_pipe.generate([[5, token]])


@pytest.mark.parametrize("family, mask", [("llada", 511), ("dream", 500)])
@pytest.mark.parametrize("where", ["alone", "only masks", "inside"])
def test_mask_token_ids_are_refused(golden_pipes, family, mask, where):
    prompt = {"alone": [mask], "only masks": [mask] * 5, "inside": [7, 8, mask, 9]}[where]
    position = 2 if where == "inside" else 0
    with pytest.raises(PromptError, match=rf"prompt 0: position {position} is the mask token \(id {mask}\); a prompt "
                                          r"cannot contain it"):
        golden_pipes[family].generate(prompt)


@pytest.mark.parametrize("text", ["<|mask|>", "Q: what is <|mask|>?\nA: ", "<|mask|><|mask|><|mask|>"])
def test_mask_token_text_is_refused(default_pipe, text):
    with pytest.raises(PromptError, match=r"is the mask token '<\|mask\|>' \(id 4\)"):
        default_pipe.generate([text])
    with pytest.raises(PromptError, match="mask token"):
        default_pipe.generate(["Q: fine\nA: ", text], chat=False)


def test_mask_text_on_the_command_line(capsys):
    code = main(["generate", "Q: <|mask|>\nA: ", "--recipe", "recipes/baseline.yaml",
                 "--set", "generation.gen_length=32", "--set", "generation.steps=32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "dare-pipeline: error: prompt 0: position 3 is the mask token '<|mask|>' (id 4)" in err


@pytest.mark.parametrize("text", ["caf\udcff", "\ud800x"])
def test_text_that_is_not_utf8(default_pipe, text):
    with pytest.raises(PromptError, match="prompt 0: not valid UTF-8 text: .* at character"):
        default_pipe.generate(text)


@pytest.mark.parametrize("prompts, problem", [
    ([[1.5, 2]], r"prompt 0: position 0 = 1.5 is not a token id"),
    ([[1, True]], r"prompt 0: position 1 = True is not a token id"),
    ([[1, "2"]], r"prompt 0: position 1 = '2' is not a token id"),
    ([[1, [2]]], r"prompt 0: position 1 = \[2\] is not a token id"),
    ([[1], None], r"prompt 1 = None: expected a str \(text\) or a list of token ids"),
    ([[1], b"ab"], r"prompt 1: bytes b'ab'"),
    (b"ab", r"prompts = b'ab': expected a str, a list of token ids"),
    (None, r"prompts = None"), (7, r"prompts = 7"),
    ([], r"no prompts"), ([[]], r"prompt 0 is empty"), ([[1], []], r"prompt 1 is empty")])
def test_values_that_are_not_prompts(golden_pipes, prompts, problem):
    with pytest.raises(PromptError, match=problem):
        golden_pipes["llada"].generate(prompts)


def test_integer_like_ids_are_prompts(golden_pipes):
    import numpy as np
    import torch

    pipe = golden_pipes["llada"]
    want = pipe.generate([[1, 2, 3]]).sequences
    assert pipe.generate([torch.tensor([1, 2, 3])]).sequences == want
    assert pipe.generate([np.array([1, 2, 3])]).sequences == want
    assert pipe.generate([1, 2, 3]).sequences == want  # one prompt


def test_text_without_a_tokenizer_and_too_long_prompts(golden_pipes, golden_models):
    with pytest.raises(PromptError, match="this checkpoint has no tokenizer; pass token ids"):
        golden_pipes["llada"].generate("hello")
    longest = golden_models["llada"].config.max_sequence_length
    with pytest.raises(PromptError, match=rf"prompt of {longest} tokens \+ gen_length 32 exceeds"):
        golden_pipes["llada"].generate([[5] * longest])
