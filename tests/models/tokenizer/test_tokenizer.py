"""Tests of the character-level tokenizer: fixed layout, saved files, offline reload, exact round-trips."""

from __future__ import annotations

import json
from itertools import islice

import pytest
from transformers import AutoTokenizer

from dare_pipeline.evaluation.suite import HELDOUT_FILE, format_prompt, read_jsonl, training_pairs
from dare_pipeline.models.tokenizer import (
    BOS_ID,
    CHARS,
    CHAT_TEMPLATE,
    EOS_ID,
    EOT_ID,
    MASK_ID,
    NEWLINE_ID,
    PAD_ID,
    VOCAB_SIZE,
    build_tokenizer,
    save_tokenizer,
)

TRICKY = "  a . b , c 's n't ! ? --  \n\n Q: x\nA:  #### 1 " + "".join(chr(i) for i in range(32, 127)) + "\n"


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(saved_dir):
    return AutoTokenizer.from_pretrained(saved_dir, local_files_only=True)


def test_layout_constants():
    assert (PAD_ID, BOS_ID, EOS_ID, EOT_ID, MASK_ID, NEWLINE_ID) == (0, 1, 2, 3, 4, 5)
    assert VOCAB_SIZE == 101 == 5 + len(CHARS)


def test_saved_files(saved_dir):
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in saved_dir.iterdir()
    }
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["clean_up_tokenization_spaces"] is False


def test_reloaded_ids_match_constants(tok):
    assert len(tok) == VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (PAD_ID, BOS_ID, EOS_ID, MASK_ID)
    assert tok.convert_tokens_to_ids("<|eot|>") == EOT_ID
    assert tok.encode("\n") == [NEWLINE_ID]
    assert tok.encode("".join(chr(i) for i in range(32, 127))) == [i - 26 for i in range(32, 127)]


@pytest.mark.parametrize("make", [build_tokenizer, None], ids=["built", "reloaded"])
def test_round_trip_is_exact(make, tok):
    t = make() if make else tok
    texts = [TRICKY]
    for r in read_jsonl(HELDOUT_FILE):
        texts += [r["prompt"], r["answer"], r["prompt"] + r["answer"]]
    texts += [p + a for p, a in islice(training_pairs(0), 200)]
    for s in texts:
        ids = t(s)["input_ids"]  # add_special_tokens defaults to True: must still add nothing
        assert len(ids) == len(s)  # one token per character, no BOS/EOS
        assert t.decode(ids) == s
        assert t.decode(ids, clean_up_tokenization_spaces=False) == s


def test_special_tokens_are_atomic_and_skippable(tok):
    ids = tok.encode("a<|mask|><|mask|>b<|eot|><|eos|><|pad|>")
    assert ids == [tok.convert_tokens_to_ids("a"), MASK_ID, MASK_ID, tok.convert_tokens_to_ids("b"), EOT_ID, EOS_ID, PAD_ID]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(ids) == "a<|mask|><|mask|>b<|eot|><|eos|><|pad|>"


def test_out_of_vocab_characters_are_dropped(tok):
    # Documented behaviour (no unk token): the suite never produces them.
    assert tok.decode(tok.encode("a\tb\u00e9c")) == "abc"


def test_chat_template_matches_few_shot_format(tok):
    shot = {"question": "reverse abc", "answer": "#### cba"}
    problem = {"question": "reverse xyz", "answer": "#### zyx"}
    messages = [
        {"role": "user", "content": shot["question"]},
        {"role": "assistant", "content": shot["answer"]},
        {"role": "user", "content": problem["question"]},
    ]
    expected = format_prompt(problem, [shot])
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
