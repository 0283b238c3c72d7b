"""Prompts: text, chat messages or token ids turned into the token ids a model decodes (encode.py),
read from prompt files (files.py), and checked before any model runs (check.py)."""

from .check import PromptError, as_token_ids, check_text, check_token_ids, prompt_list
from .encode import QA_PROMPT, as_batch, encode, format_hint, is_chat, render
from .files import FORMATS, read_prompts

__all__ = ["FORMATS", "QA_PROMPT", "PromptError", "as_batch", "as_token_ids", "check_text", "check_token_ids",
           "encode", "format_hint", "is_chat", "prompt_list", "read_prompts", "render"]
