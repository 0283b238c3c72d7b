"""From a validated request to the rows the scheduler decodes: the recipe after the request's
settings, `max_tokens` turned into a generation length, prompts into token ids, and the errors
a client gets for anything out of bounds."""

from __future__ import annotations

import json
import math

import attrs

from ..config.loading import ConfigError
from ..config.recipe import Recipe, apply_override
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
MAX_PROMPTS = 64


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

    def __attrs_post_init__(self):
        object.__setattr__(self, "recipe", self.recipe.for_model(self.model))


@attrs.frozen(eq=False)
class RowSpec:
    """One answer to decode: a prompt (token ids) and the recipe its batch must share."""

    index: int  # the choice index in the response
    ids: list[int]
    recipe: Recipe
    key: str  # rows with equal keys may decode in one batch


def plan_rows(request, served: Served, chat: bool) -> list[RowSpec]:
    if request.model is not None and request.model != served.name:
        raise RequestError(404, f"model = {request.model!r}: unknown model; this server serves {served.name!r}",
                           "model", "model_not_found")
    recipe = request_recipe(request, served)
    gen = recipe.generation
    prompts = _chat_prompt(request, served) if chat else _completion_prompts(request, served)
    field = "messages" if chat else "prompt"
    limit = served.model.config.max_sequence_length
    for ids in prompts:
        if len(ids) + gen.gen_length > limit:
            raise RequestError(400, f"{field}: {len(ids)} prompt tokens + gen_length {gen.gen_length} (max_tokens "
                               f"rounded up to the block length) exceed the model's max_sequence_length {limit}",
                               field, "context_length_exceeded")
    if request.n > MAX_N:
        raise RequestError(400, f"n = {request.n}: must be between 1 and {MAX_N}", "n")
    sampling = gen.temperature > 0 or gen.remasking == "random"
    rows = []
    for p, ids in enumerate(prompts):
        for j in range(request.n):
            # each sampled choice draws from its own seed; greedy choices are equal whatever the seed
            row_recipe = recipe
            if sampling and j:
                row_recipe = attrs.evolve(recipe, generation=attrs.evolve(gen, seed=gen.seed + j))
            rows.append(RowSpec(index=p * request.n + j, ids=ids, recipe=row_recipe,
                                key=batch_key(row_recipe, sampling)))
    return rows


def batch_key(recipe: Recipe, sampling: bool) -> str:
    doc = recipe.to_dict()
    if not sampling:  # the seed only feeds sampling: greedy rows of any seed decode together
        doc["generation"].pop("seed")
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
        except ConfigError as error:
            raise RequestError(400, str(error), f"recipe_overrides.{key}") from None
    gen = doc["generation"]
    if request.temperature is not None:
        gen["temperature"] = request.temperature
    if request.seed is not None:
        gen["seed"] = request.seed
    if request.stop is not None:
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        if len(stop) > 4 or not all(stop):
            raise RequestError(400, f"stop = {request.stop!r}: at most 4 non-empty strings", "stop")
        gen["stop"] = list(served.recipe.generation.stop) + stop
    max_tokens = request.max_tokens or min(served.recipe.generation.gen_length, served.max_tokens)
    if max_tokens > served.max_tokens:
        raise RequestError(400, f"max_tokens = {max_tokens}: must be between 1 and {served.max_tokens}", "max_tokens")
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
        param = next((f"recipe_overrides.{k}" for k in request.recipe_overrides), "max_tokens")
        raise RequestError(400, str(error), param) from None


def generation_length(gen_length: int, block_length: int, steps: int, max_tokens: int) -> dict:
    """`max_tokens` as the recipe's geometry: rounded up to whole blocks, each block keeping its
    steps; a one-block recipe keeps one block of exactly `max_tokens`, its steps scaled."""
    if block_length >= gen_length:
        return {"gen_length": max_tokens, "block_length": max_tokens,
                "steps": max(1, math.ceil(steps * max_tokens / gen_length))}
    blocks = math.ceil(max_tokens / block_length)
    steps_per_block = max(1, round(steps * block_length / gen_length))
    return {"gen_length": blocks * block_length, "block_length": block_length, "steps": blocks * steps_per_block}


def _encode(text: str, served: Served, field: str) -> list[int]:
    tokenizer = served.model.tokenizer
    if tokenizer is None:
        raise RequestError(400, f"{field}: this model has no tokenizer; send token ids", field)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _completion_prompts(request, served: Served) -> list[list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise RequestError(400, "prompt: empty list", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(400, f"prompt: {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    prompts = [_encode(p, served, "prompt") if isinstance(p, str) else list(p) for p in prompt]
    return _checked(prompts, served, "prompt")


def _chat_prompt(request, served: Served) -> list[list[int]]:
    tokenizer = served.model.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError(400, "messages: this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _checked([_encode(text, served, "messages")], served, "messages")


def _checked(prompts: list[list[int]], served: Served, field: str) -> list[list[int]]:
    """The prompts, checked as the engine checks them (ids the model can embed, no mask token, none
    empty): a request that fails gets a 400 naming `field`."""
    try:
        check_token_ids(prompts, served.model.config, served.model.tokenizer)
    except PromptError as error:
        raise RequestError(400, f"{field}: {error}", field) from None
    return prompts
