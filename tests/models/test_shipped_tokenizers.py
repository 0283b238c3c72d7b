"""Tokenizers whose class is code shipped with the checkpoint (tokenizer_config.json's auto_map, as
Dream's DreamTokenizer): read with transformers' own tokenizer for the same files, never by running
the checkpoint's code; an unknown one loads from its tokenizer.json, else is refused by name."""

from __future__ import annotations

import json

import pytest

from dare_pipeline.models import CheckpointError
from dare_pipeline.models.loader import _load_tokenizer

# a checkpoint's tokenizer code that must never run
POISON = "raise RuntimeError('the checkpoint\\'s own tokenizer code ran')\n"
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (printable bytes as themselves, the others shifted past 255), which
    Qwen2's vocab.json spells its byte tokens in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


def _dream_like(directory, tokenizer_class="DreamTokenizer", with_tokenizer_json=False):
    """A byte-level BPE tokenizer saved as Dream's checkpoints save theirs: vocab.json, merges.txt and
    a tokenizer_config.json naming a class whose code (tokenization_dream.py) ships beside them."""
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    (directory / "tokenization_dream.py").write_text(POISON)
    special = {str(len(vocab)): "<|endoftext|>", str(len(vocab) + 1): "<|mask|>"}  # after the vocabulary, as Qwen2's
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": {i: {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                     "normalized": False, "single_word": False} for i, t in special.items()},
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"}))
    if with_tokenizer_json:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        bpe = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.save(str(directory / "tokenizer.json"))
    return directory


def test_dreams_own_tokenizer_class_is_read_as_qwen2s_byte_level_bpe_without_its_code(tmp_path):
    tokenizer = _load_tokenizer(_dream_like(tmp_path))
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert ids == [vocab[t] for t in ("hell", "o", "Ġw", "o", "r", "l", "d")]  # the merges, in their order
    assert tokenizer.decode(ids) == "hello world"
    mask = len(vocab) + 1
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == mask and tokenizer.eos_token_id == mask - 1
    assert tokenizer("a<|mask|>b", add_special_tokens=False)["input_ids"][1] == mask


def test_a_tokenizer_whose_mask_token_is_not_the_models_is_refused(tmp_path):
    from types import SimpleNamespace

    from dare_pipeline.models.checkpoint_checks import check_tokenizer_size

    tokenizer = _load_tokenizer(_dream_like(tmp_path))
    mask = tokenizer.convert_tokens_to_ids("<|mask|>")
    check_tokenizer_size(tokenizer, SimpleNamespace(embedding_size=512, mask_token_id=mask), tmp_path)
    with pytest.raises(CheckpointError, match=rf"the tokenizer's mask token '<\|mask\|>' is id {mask}, config.json's "
                                              rf"mask_token_id is 500; tokenizer and weights do not belong together"):
        check_tokenizer_size(tokenizer, SimpleNamespace(embedding_size=512, mask_token_id=500), tmp_path)


def test_an_unknown_shipped_tokenizer_class_is_read_from_its_tokenizer_json(tmp_path):
    tokenizer = _load_tokenizer(_dream_like(tmp_path, "SomeLabTokenizer", with_tokenizer_json=True))
    assert tokenizer.decode(tokenizer("hello world", add_special_tokens=False)["input_ids"]) == "hello world"


def test_an_unknown_shipped_tokenizer_class_without_tokenizer_json_is_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: tokenizer_class = 'SomeLabTokenizer' is code "
                                              r"shipped with the checkpoint \(auto_map\), which dare-pipeline does "
                                              r"not run; it reads \['DreamTokenizer'\]"):
        _load_tokenizer(_dream_like(tmp_path, "SomeLabTokenizer"))


def test_an_auto_map_beside_a_class_transformers_has_is_read_with_that_class(tmp_path):
    """Some checkpoints name transformers' own class and still ship an auto_map: read as before, by
    transformers' class, without a tokenizer.json and without the shipped code."""
    tokenizer = _load_tokenizer(_dream_like(tmp_path, "Qwen2Tokenizer"))
    assert tokenizer.decode(tokenizer("hello world", add_special_tokens=False)["input_ids"]) == "hello world"
