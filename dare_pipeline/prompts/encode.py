"""What a prompt may be, and how it becomes token ids.

A prompt is text, a list of token ids, or a chat: a list of messages
(`{"role": "user" | "assistant" | "system", "content": str}`) rendered by the tokenizer's chat
template. `chat` decides what happens to text:

- `True`: text is one user message, rendered by the chat template;
- `False`: text is encoded as it is;
- `None` (the default): as it is, except for a model that only answers the embedded tokenizer's
  `Q: ...\\nA: ` format (its chat template is the embedded one): text not in that format goes
  through the template, so `"add 3+4+5+6"` reaches the model as `"Q: add 3+4+5+6\\nA: "`.
"""

from __future__ import annotations

import re

from ..config.loading import shown
from .check import PromptError, as_token_ids, check_text, prompt_list

# the embedded model's prompt: a question (or few-shot examples) ending in the answer cue
QA_PROMPT = re.compile(r"\AQ: .*\nA: \Z", re.DOTALL)


def is_chat(prompt) -> bool:
    """A list of message mappings (one conversation), as opposed to text or token ids."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def answers_qa_format_only(tokenizer) -> bool:
    """The tokenizer is the embedded character tokenizer, whose models answer `Q: ...\\nA: ` prompts only."""
    if tokenizer is None:
        return False
    from ..models.tokenizer import CHAT_TEMPLATE  # here: it imports transformers

    return getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE


def as_batch(prompts) -> list:
    """One prompt (text, token ids or a conversation) or a list of them, as a list of prompts."""
    if is_chat(prompts):
        return [prompts]
    return prompt_list(prompts)


# the roles chat templates render; another role is dropped or rendered as text by some templates
ROLES = ("system", "user", "assistant")


def _is_message(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _check_messages(messages, index: int) -> list[dict]:
    bad = next((i for i, m in enumerate(messages) if not _is_message(m)), None)
    if bad is not None:
        raise PromptError(f"prompt {index}, message {bad}: {shown(messages[bad])}: expected a mapping with string "
                          f"'role' and 'content' keys, e.g. {{'role': 'user', 'content': 'add 3+4+5+6'}}")
    bad = next((i for i, m in enumerate(messages) if m["role"] not in ROLES), None)
    if bad is not None:
        raise PromptError(f"prompt {index}, message {bad}: role = {shown(messages[bad]['role'])}: allowed roles: "
                          f"{list(ROLES)}")
    return list(messages)


def render(tokenizer, prompt, chat: bool | None, index: int = 0, source: str = "the model") -> str:
    """The text the model sees for a text or chat prompt."""
    if is_chat(prompt):
        if chat is False:
            raise ValueError(f"prompt {index} is a list of chat messages, which only a chat template can render; "
                             f"pass chat=True (or leave chat unset)")
        messages = _check_messages(prompt, index)
    elif chat or (chat is None and answers_qa_format_only(tokenizer) and not QA_PROMPT.match(prompt)):
        messages = [{"role": "user", "content": prompt}]
    else:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{source}: the tokenizer has no chat template; pass text or token ids without chat")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, prompts, chat: bool | None = None, source: str = "the model") -> list[list[int]]:
    """Token ids for each prompt of `prompts` (one prompt or a list; see the module docstring)."""
    ids = []
    for index, p in enumerate(as_batch(prompts)):
        if isinstance(p, str) or is_chat(p):
            if isinstance(p, str):
                check_text(p, index)
                if not p:  # refused before a chat template would make a question of nothing
                    raise PromptError(f"prompt {index} is empty: every prompt needs at least one token")
            if tokenizer is None:
                raise PromptError(f"{source}: this checkpoint has no tokenizer; pass token ids")
            ids.append(tokenizer(render(tokenizer, p, chat, index, source), add_special_tokens=False)["input_ids"])
        else:
            ids.append(as_token_ids(p, index))
    return ids  # checked against the model (ids, mask token, empty prompts) by prompt_check.check_token_ids


def format_hint(tokenizer, prompt, chat: bool | None) -> str | None:
    """Why an answer will be empty or nonsense: raw text to a model that answers only `Q: ...\nA: `."""
    if isinstance(prompt, str) and chat is False and answers_qa_format_only(tokenizer) and not QA_PROMPT.match(prompt):
        return (f"{prompt[:40]!r} is not in this model's prompt format 'Q: <question>\\nA: ' (docs/tasks.md), "
                f"so its answer is empty or nonsense; without --no-chat (chat=False) its chat template adds it")
    return None
