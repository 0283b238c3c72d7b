"""Prompts checked before they reach the model: text that is valid Unicode, token ids the model can
embed, and no mask token (the decoder fills every mask position, so a mask in the prompt would be
decoded as part of the answer, differently alone and in a batch)."""

from __future__ import annotations

import operator
from collections.abc import Mapping

from ..config.loading import ConfigError, shown


class PromptError(ConfigError):
    """A prompt the model cannot take; the message names the prompt, the position and what is allowed."""


def prompt_list(prompts) -> list:
    """One prompt (a str or a list of token ids) or a list of them, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Mapping):  # iterating it would give its keys as prompts ("role", "content")
        raise PromptError(f"prompts = {shown(prompts)}: one mapping; a chat is a list of messages, "
                          "e.g. [{'role': 'user', 'content': 'add 3+4+5+6'}]")
    if isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__iter__"):
        raise PromptError(f"prompts = {prompts!r}: expected a str, a list of token ids, or a list of those")
    if getattr(prompts, "ndim", None) == 1:  # a 1-D tensor or array of token ids: one prompt
        return [prompts]
    prompts = list(prompts)
    if prompts and not isinstance(prompts[0], (str, bytes, bytearray)) and not hasattr(prompts[0], "__iter__"):
        return [prompts]  # one prompt of token ids
    return prompts


def check_text(text: str, index: int) -> str:
    """`text` unchanged when it encodes as UTF-8 (command-line bytes that are not UTF-8 arrive as lone
    surrogates, which no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start:exc.end]
        raise PromptError(f"prompt {index}: not valid UTF-8 text: {bad!r} at character {exc.start}; give UTF-8 "
                          f"text or token ids") from None
    return text


def as_token_ids(prompt, index: int) -> list[int]:
    """A prompt given as a sequence of integers, as a list of ints (no bools, floats, bytes or text)."""
    if isinstance(prompt, (bytes, bytearray)):
        raise PromptError(f"prompt {index}: bytes {bytes(prompt)[:20]!r}; give a str (text) or a list of token ids")
    try:
        items = list(prompt)
    except TypeError:
        raise PromptError(f"prompt {index} = {prompt!r}: expected a str (text) or a list of token ids") from None
    ids = []
    for position, item in enumerate(items):
        try:
            if isinstance(item, bool):
                raise TypeError
            ids.append(operator.index(item))
        except TypeError:
            raise PromptError(f"prompt {index}: position {position} = {item!r} is not a token id; expected "
                              f"integers") from None
    return ids


def check_token_ids(prompts: list[list[int]], config, tokenizer=None) -> None:
    """Every id within 0 .. vocab_size - 1, none the mask token nor a padding token that is only that;
    every prompt non-empty."""
    vocab, rows, mask = config.vocab_size, config.embedding_size, config.mask_token_id
    # a pad id that is also the model's eos or bos (LLaDA, Dream) may be meant as that token
    pad = config.pad_token_id if config.pad_token_id not in (None, config.eos_token_id, config.bos_token_id) else None
    if not prompts:
        raise PromptError("no prompts: give at least one prompt")
    for index, ids in enumerate(prompts):
        if not ids:
            raise PromptError(f"prompt {index} is empty: every prompt needs at least one token")
        for position, token in enumerate(ids):
            if not 0 <= token < vocab:
                unused = (f"; ids {vocab} to {rows - 1} are unused rows of the embedding"
                          if rows > vocab and vocab <= token < rows else "")
                raise PromptError(f"prompt {index}: token id {token} at position {position} is out of range: "
                                  f"allowed 0 to {vocab - 1} (the model's vocab_size {vocab}){unused}")
            if token == mask:
                name = f" {tokenizer.convert_ids_to_tokens(mask)!r}" if tokenizer is not None else ""
                raise PromptError(f"prompt {index}: position {position} is the mask token{name} (id {mask}); a "
                                  f"prompt cannot contain it: the decoder fills every mask position")
            if token == pad:
                name = f" {tokenizer.convert_ids_to_tokens(pad)!r}" if tokenizer is not None else ""
                raise PromptError(f"prompt {index}: position {position} is the padding token{name} (id {pad}); a "
                                  f"prompt cannot contain it: the padding a batch adds is masked out, a pad id in a "
                                  f"prompt would be attended to as text")
