"""From a validated request to the rows the scheduler decodes: the recipe after the request's
settings, `max_tokens` turned into a generation length, prompts into token ids, and the errors
a client gets for anything out of bounds."""

from __future__ import annotations

import json
import math
import re
import secrets

import attrs

from ..config.loading import ConfigError
from ..config.recipe import Recipe, apply_override
from ..core.sampling import filters_apply
from ..prompts.check import PromptError, check_token_ids

# the recipe keys a request may change through `recipe_overrides`: they steer decoding of the
# request's own rows and cannot load files, change the model, its device or how it executes
SAFE_OVERRIDES = (
    "generation.steps",
    "generation.block_length",
    "generation.remasking",
    "generation.confidence",
    "plugins.threshold_decoding.threshold",
    "plugins.factor_decoding.factor",
    "plugins.dare_kv.threshold",
    "plugins.dare_o.threshold",
)
MAX_N = 16
# a stop string is searched for in every streamed row's text after every step: bounded, so that a
# request cannot make each step of a shared batch slow
MAX_STOP_CHARS = 256
MAX_PROMPTS = 64
# a tokenizer's normalizer may merge characters (NFC composes a letter and up to ~3 combining marks
# into one): a prompt may have this many times more characters than its tokens' strings hold
NORMALIZATION_SLACK = 4


class RequestError(Exception):
    """A client error, answered as OpenAI's error object with `param` naming the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@attrs.frozen
class Served:
    """What the server decodes with: the loaded model, its name for clients, the base recipe."""

    name: str
    model: object
    recipe: Recipe  # kept as it decodes on the model: its answer length where the recipe leaves it
    max_tokens: int  # the largest max_tokens a request may ask for
    # the longest token of the vocabulary, in characters: a prompt of more than (room for prompt
    # tokens) x this x NORMALIZATION_SLACK characters cannot fit, and is refused before tokenizing
    max_token_chars: int = attrs.field(init=False)

    @max_token_chars.default
    def _longest_token(self) -> int:
        tokenizer = self.model.tokenizer
        return 0 if tokenizer is None else max((len(t) for t in tokenizer.get_vocab()), default=1)

    def __attrs_post_init__(self):
        object.__setattr__(self, "recipe", self.recipe.for_model(self.model))


@attrs.frozen(eq=False)
class RowSpec:
    """One answer to decode: a prompt (token ids) and the recipe its batch must share."""

    index: int  # the choice index in the response
    ids: list[int]
    recipe: Recipe
    key: str  # rows with equal keys may decode in one batch
    seed: int  # the row's own sampling seed (rows of any seeds share a batch)


def plan_rows(request, served: Served, chat: bool, max_rows: int | None = None) -> list[RowSpec]:
    """The request's rows, every limit checked before any heavy work: the row count and each prompt's
    length in characters before a prompt is tokenized, each prompt's tokens as soon as it is."""
    if request.model is not None and request.model != served.name:
        raise RequestError(404, f"model = {request.model!r}: unknown model; this server serves {served.name!r}",
                           "model", "model_not_found")
    n = 1 if request.n is None else request.n
    if n > MAX_N:
        raise RequestError(400, f"n = {n}: must be between 1 and {MAX_N}", "n")
    recipe = request_recipe(request, served)
    gen = recipe.generation
    check_neutral_options(request)
    field = "messages" if chat else "prompt"
    count = 1 if chat else len(_completion_prompt_list(request))
    if max_rows is not None and count * n > max_rows:
        raise RequestError(400, f"{field}: {count} prompt(s) x n {n} = {count * n} rows, and the server queues at most "
                           f"{max_rows} (--max-queue): this request can never fit; send fewer prompts or a smaller n",
                           "n" if n > 1 else field, "too_many_rows")
    limit = served.model.config.max_sequence_length
    fits = _PromptRoom(field, limit, gen.gen_length, served)
    prompts = _chat_prompt(request, served, fits) if chat else _completion_prompts(request, served, fits)
    sampling = gen.temperature > 0 or gen.remasking == "random"
    # a sampling request without a seed draws one, as OpenAI's and vLLM's servers do (each choice's
    # seed is in its `dare.seed`: sent back, it gives that answer again)
    base = gen.seed if request.seed is not None or not sampling else secrets.randbelow(2**31)
    key = batch_key(recipe, served.model.config.family)
    # each sampled choice draws from its own seed; greedy choices are equal whatever the seed
    return [RowSpec(index=p * n + j, ids=ids, recipe=recipe, key=key, seed=base + j if sampling else base)
            for p, ids in enumerate(prompts) for j in range(n)]


def check_neutral_options(request) -> None:
    """OpenAI options this server accepts only where they change nothing (clients send them by
    default): anything else is refused with what to send instead."""
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(request, name)
        if value is not None and value != 0:
            raise RequestError(400, f"{name} = {value}: repetition penalties are not implemented; send 0 or leave "
                               "it out", name)
    if request.logit_bias:
        raise RequestError(400, "logit_bias: not implemented; send {} or leave it out", "logit_bias")
    if request.logprobs is not None and request.logprobs is not False:  # completions' 0 still asks for some
        raise RequestError(400, f"logprobs = {json.dumps(request.logprobs)}: log probabilities are not returned by "
                           f"this server; send {'false' if isinstance(request.logprobs, bool) else 'null'} or leave "
                           "it out", "logprobs")
    if getattr(request, "top_logprobs", None):
        raise RequestError(400, f"top_logprobs = {request.top_logprobs}: log probabilities are not returned by this "
                           "server; send 0 or leave it out", "top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise RequestError(400, "stream_options: only allowed when stream is true", "stream_options")


def batch_key(recipe: Recipe, family: str) -> str:
    """What rows must share to decode in one batch: the recipe, but its seed (each row brings its own,
    RowSpec.seed) and sampling filters that change nothing for the model's family."""
    doc = recipe.to_dict()
    gen = recipe.generation
    doc["generation"].pop("seed")
    if not filters_apply(family, gen.temperature, gen.top_p, gen.top_k):  # nor do filters that change nothing
        doc["generation"].pop("top_p")
        doc["generation"].pop("top_k")
    return json.dumps(doc, sort_keys=True, default=str)


def request_recipe(request, served: Served) -> Recipe:
    """The base recipe with the request's overrides, sampling settings and generation length."""
    doc = served.recipe.to_dict()
    for key, value in request.recipe_overrides.items():
        if key not in SAFE_OVERRIDES:
            raise RequestError(400, f"recipe_overrides.{key}: not a key a request may override; allowed: "
                               f"{list(SAFE_OVERRIDES)}", f"recipe_overrides.{key}")
        try:
            apply_override(doc, f"{key}={json.dumps(value)}", "recipe_overrides")
        except (ConfigError, RecursionError) as error:
            raise RequestError(400, f"recipe_overrides.{key}: {_one_line(error)}", f"recipe_overrides.{key}") from None
    gen = doc["generation"]
    if request.temperature is not None:
        gen["temperature"] = request.temperature
    if request.top_p is not None:
        gen["top_p"] = request.top_p
    if request.top_k is not None:
        gen["top_k"] = max(request.top_k, 0)  # vLLM's -1 is off, as 0 is
    if request.seed is not None:
        gen["seed"] = request.seed
    if request.stop is not None:
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        if len(stop) > 4 or not all(stop) or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise RequestError(400, f"stop = {json.dumps(request.stop)[:200]}: at most 4 non-empty strings of at most "
                               f"{MAX_STOP_CHARS} characters", "stop")
        gen["stop"] = list(served.recipe.generation.stop) + stop
    length_field, max_tokens = _max_tokens(request, served)
    if max_tokens > served.max_tokens:
        raise RequestError(400, f"{length_field} = {max_tokens}: must be between 1 and {served.max_tokens}",
                           length_field)
    block = gen["block_length"]
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:  # the geometry below needs a count
        raise RequestError(400, f"recipe_overrides.generation.block_length = {json.dumps(block)[:80]}: must be an "
                           "integer >= 1", "recipe_overrides.generation.block_length")
    steps = gen["steps"]
    gen.update(generation_length(served.recipe.generation.gen_length, gen["block_length"],
                                 served.recipe.generation.steps, max_tokens))
    if "generation.steps" in request.recipe_overrides:  # an explicit step count is for the request's length
        gen["steps"] = steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= gen["gen_length"]:
            raise RequestError(400, f"recipe_overrides.generation.steps = {steps!r}: must be an integer between 1 "
                               f"and gen_length {gen['gen_length']}", "recipe_overrides.generation.steps")
    try:
        return Recipe.from_dict(doc, source="request")
    except ConfigError as error:
        raise RequestError(400, str(error), _param_of(str(error), request, length_field)) from None


def _max_tokens(request, served: Served) -> tuple[str, int]:
    """The answer length asked for and the field that asked (max_completion_tokens is OpenAI's newer
    name of max_tokens); without either, the recipe's length capped by the server's limit."""
    both = request.max_tokens, request.max_completion_tokens
    if None not in both and both[0] != both[1]:
        raise RequestError(400, f"max_completion_tokens = {both[1]} and max_tokens = {both[0]}: the same setting "
                           "twice with different values; send one", "max_completion_tokens")
    if request.max_completion_tokens is not None:
        return "max_completion_tokens", request.max_completion_tokens
    if request.max_tokens is not None:
        return "max_tokens", request.max_tokens
    return "max_tokens", min(served.recipe.generation.gen_length, served.max_tokens)


def _param_of(message: str, request, length_field: str) -> str:
    """The request field a recipe error comes from, found by the recipe key its message names
    ("generation: temperature = ..." names the key temperature)."""
    def names(key: str) -> bool:
        return re.search(rf"(^|[\s.:]){re.escape(key.rsplit('.', 1)[-1])} = ", message) is not None

    for key in request.recipe_overrides:
        if names(key):
            return f"recipe_overrides.{key}"
    for name in ("temperature", "seed", "stop"):
        if getattr(request, name) is not None and names(name):
            return name
    return next((f"recipe_overrides.{k}" for k in request.recipe_overrides), length_field)


def _one_line(error: Exception) -> str:
    text = str(error) if not isinstance(error, RecursionError) else "nested too deeply"
    return text if len(text) <= 500 else text[:500] + "..."


def generation_length(gen_length: int, block_length: int, steps: int, max_tokens: int) -> dict:
    """`max_tokens` as the recipe's geometry: rounded up to whole blocks, each block keeping its
    steps; a one-block recipe keeps one block of exactly `max_tokens`, its steps scaled."""
    if block_length >= gen_length:
        return {"gen_length": max_tokens, "block_length": max_tokens,
                "steps": max(1, math.ceil(steps * max_tokens / gen_length))}
    blocks = math.ceil(max_tokens / block_length)
    steps_per_block = max(1, round(steps * block_length / gen_length))
    return {"gen_length": blocks * block_length, "block_length": block_length, "steps": blocks * steps_per_block}


@attrs.frozen
class _PromptRoom:
    """Checks that a prompt leaves room for the answer in the model's context: by its characters
    before it is tokenized (a bound from the longest token), then by its tokens."""

    field: str
    limit: int  # the model's max_sequence_length
    gen_length: int
    served: Served

    def check_chars(self, chars: int) -> None:
        room = max(self.limit - self.gen_length, 0)
        if chars > room * self.served.max_token_chars * NORMALIZATION_SLACK:
            raise RequestError(400, f"{self.field}: {chars:,} characters cannot fit in the {room} tokens the model's "
                               f"max_sequence_length {self.limit} leaves beside gen_length {self.gen_length} "
                               "(max_tokens rounded up to the block length)", self.field, "context_length_exceeded")

    def check_tokens(self, ids: list[int]) -> list[int]:
        if len(ids) + self.gen_length > self.limit:
            raise RequestError(400, f"{self.field}: {len(ids)} prompt tokens + gen_length {self.gen_length} "
                               "(max_tokens rounded up to the block length) exceed the model's max_sequence_length "
                               f"{self.limit}", self.field, "context_length_exceeded")
        return ids


def _unicode(text: str, field: str) -> str:
    """`text` unchanged when it is valid Unicode (JSON's escapes can carry a lone surrogate, which no
    tokenizer takes); else a 400 naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(400, f"{field}: not valid Unicode text: a lone surrogate {ascii(text[error.start])} at "
                           f"character {error.start}", field) from None
    return text


def _encode(text: str, served: Served, room: _PromptRoom, field: str | None = None) -> list[int]:
    tokenizer = served.model.tokenizer
    if tokenizer is None:
        raise RequestError(400, f"{room.field}: this model has no tokenizer; send token ids", room.field)
    _unicode(text, field or room.field)
    room.check_chars(len(text))
    return room.check_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def _completion_prompt_list(request) -> list:
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise RequestError(400, "prompt: empty list", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(400, f"prompt: {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    return prompt


def _completion_prompts(request, served: Served, room: _PromptRoom) -> list[list[int]]:
    listed = _completion_prompt_list(request)
    prompts = [_encode(p, served, room, "prompt" if len(listed) == 1 else f"prompt[{i}]") if isinstance(p, str)
               else room.check_tokens(list(p)) for i, p in enumerate(listed)]
    return _checked(prompts, served, "prompt")


def _chat_prompt(request, served: Served, room: _PromptRoom) -> list[list[int]]:
    tokenizer = served.model.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError(400, "messages: this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": _unicode(m.content, f"messages[{i}].content")}
                for i, m in enumerate(request.messages)]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as error:  # the template refuses these messages (raise_exception in it)
        raise RequestError(400, f"messages: the model's chat template refuses them: {error}", "messages") from None
    return _checked([_encode(text, served, room)], served, "messages")


def _checked(prompts: list[list[int]], served: Served, field: str) -> list[list[int]]:
    """The prompts, checked as the engine checks them (ids the model can embed, no mask token, none
    empty): a request that fails gets a 400 naming `field`."""
    try:
        check_token_ids(prompts, served.model.config, served.model.tokenizer)
    except PromptError as error:
        raise RequestError(400, f"{field}: {error}", field) from None
    return prompts
