"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic.

Unknown fields are errors (`extra="forbid"`): an OpenAI field this server does not implement
(`logprobs`, `top_p`, ...) is refused by name instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

TokenIds = list[StrictInt]
# OpenAI's prompt forms: a string, a list of strings, token ids, or a list of token id lists
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    # answer tokens; rounded up to the recipe's block length for decoding (docs/serving.md)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    user: str | None = None  # accepted and ignored, as clients send it for their own bookkeeping
    # extension: recipe keys a request may change, by dotted path (see serving/requests.py SAFE_OVERRIDES)
    recipe_overrides: dict[str, Any] = Field(default_factory=dict)


class CompletionRequest(_Sampling):
    prompt: Prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
