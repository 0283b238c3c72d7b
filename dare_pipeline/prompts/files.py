"""Prompts read from a file or standard input (`-`), for `generate --prompts` and `calibrate --prompts`.

Two layouts:

- `lines`: every non-blank line is one text prompt (without its line ending);
- `jsonl`: every non-blank line is a JSON string (text), a list of token ids, a list of chat messages,
  or an object with a `prompt` (text or token ids; the held-out data's layout) or `messages` key.

`auto` (the default) reads JSONL when the file name ends in `.jsonl` or its first non-blank line
starts with `{`, `[` or `"`, and lines otherwise. A prompt with a line break in it (the embedded
model's few-shot prompts) needs JSONL.
"""

from __future__ import annotations

import json
import sys

from ..config.files import read_text_file
from ..config.loading import ConfigError
from .encode import is_chat

# a prompts file is read whole; past this it is more likely a wrong path than prompts
MAX_PROMPTS_BYTES = 256 << 20

FORMATS = ("auto", "lines", "jsonl")
_JSONL_HELP = ("each line is a JSON string, a list of token ids, a list of chat messages, or an object with a "
               "'prompt' or 'messages' key")


def read_prompts(path: str, layout: str = "auto") -> list:
    """The prompts of file `path` (`-`: standard input) in `layout` (see the module docstring)."""
    if layout not in FORMATS:
        raise ConfigError(f"prompts format {layout!r}: allowed: {list(FORMATS)}")
    if path == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        text, name = read_text_file(path, "prompts file", max_bytes=MAX_PROMPTS_BYTES), path
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if layout == "auto":
        jsonl = name.endswith(".jsonl") or bool(lines and lines[0][1].lstrip()[:1] in ('{', '[', '"'))
        layout = "jsonl" if jsonl else "lines"
    prompts = [_json_prompt(line, name, number) for number, line in lines] if layout == "jsonl" else [
        line for _, line in lines]
    if not prompts:
        raise ConfigError(f"{name}: no prompts")
    return prompts


def _json_prompt(line: str, name: str, number: int):
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{name}:{number}: not JSON ({error.msg}); {_JSONL_HELP} (plain text: one prompt per "
                          f"line with --prompts-format lines)") from None
    if isinstance(item, dict):
        item = item.get("messages", item.get("prompt"))
    if not (_is_text(item) or _is_ids(item) or (is_chat(item) and all(isinstance(m, dict) for m in item))):
        raise ConfigError(f"{name}:{number}: {line[:60]!r}: expected a non-empty string, a list of token ids, a list "
                          f"of chat messages, or an object with a 'prompt' or 'messages' key")
    return item


def _is_text(item) -> bool:
    return isinstance(item, str) and bool(item)


def _is_ids(item) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
