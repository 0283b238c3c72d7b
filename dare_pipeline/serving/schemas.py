"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic in strict mode: JSON
types are exact (`"max_tokens": "32"`, `true` or `"stream": "yes"` are errors naming the field).

Unknown fields are errors (`extra="forbid"`): an OpenAI field this server does not implement
(`echo`, `tools`, ...) is refused by name instead of being silently ignored. Some OpenAI fields
that clients send by default are accepted with their neutral value only (the penalties,
`logit_bias`, `logprobs`); serving/requests.py checks those values and says why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenIds = list[int]
# OpenAI's prompt forms: a string, a list of strings, token ids, or a list of token id lists
Prompt = str | list[str] | TokenIds | list[TokenIds]
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool | None = None  # a last chunk with the request's token usage


class _Sampling(BaseModel):
    model_config = STRICT

    model: str | None = None
    # answer tokens; rounded up to the recipe's block length for decoding (docs/serving.md)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name of max_tokens
    temperature: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1)  # extension, as vLLM's: 0 or -1 is off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as clients send it for their own bookkeeping
    # extension: recipe keys a request may change, by dotted path (see serving/requests.py SAFE_OVERRIDES)
    recipe_overrides: dict[str, Any] = Field(default_factory=dict)


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0)


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
