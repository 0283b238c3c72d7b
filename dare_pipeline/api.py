"""The Python entry points: `Pipeline` (a model plus a recipe) and `generate`."""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from .config.loading import ConfigError
from .config.recipe import Recipe, baseline_recipe, generation_with_overrides
from .core.loop import denoise
from .core.registry import make_manager
from .core.streaming import GenerationStream, StepReporter
from .execution.executor import executor_for
from .prompts.check import PromptError, check_token_ids
from .prompts.encode import encode as encode_prompts


@attrs.define
class GenerationOutput:
    sequences: list[list[int]]  # prompt + answer token ids per prompt (no padding)
    answers: list[list[int]]  # answer token ids, cut before the first stop token
    text: list[str] | None  # decoded answers cut at stop strings (None without a tokenizer)
    stats: object  # stats.GenerationStats
    unmask_step: list[list[int]]  # per prompt, per answer position: forward after which it was committed

    def to_dict(self) -> dict:
        return {"sequences": self.sequences, "answers": self.answers, "text": self.text,
                "unmask_step": self.unmask_step, "stats": self.stats.to_dict()}


def _as_recipe(recipe) -> Recipe:
    if recipe is None:
        return baseline_recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(Path(recipe))


class Pipeline:
    """A loaded model with a recipe's plugin stack; `generate` may be called any number of times.
    `recipe` is the recipe as it decodes on this model: the lengths it leaves unset are the model's
    (its generation_config.json) or the library defaults (config/generation.py)."""

    def __init__(self, model, recipe=None):
        self.model = model
        self.recipe = _as_recipe(recipe).for_model(model)
        self.plugins = self.recipe.instantiate_plugins()
        self.manager = make_manager(self.plugins)
        try:
            self.executor = executor_for(model, self.recipe.execution)
        except ValueError as error:  # a mode the device cannot run: name the recipe it came from
            raise ConfigError(f"{self.recipe.source}: {error}") from None

    @classmethod
    def from_recipe(cls, recipe, model_path: str | None = None) -> Pipeline:
        from .models import load_model

        recipe = _as_recipe(recipe)
        return cls(load_model(model_path or recipe.model, dtype=recipe.dtype, device=recipe.device), recipe)

    def encode(self, prompts, chat: bool | None = None) -> list[list[int]]:
        """Token ids for text, token-id or chat-message prompts (`dare_pipeline.prompts`), checked
        against the model (`dare_pipeline.prompts.check`: ids it can embed, no mask token)."""
        ids = encode_prompts(self.model.tokenizer, prompts, chat, source=str(getattr(self.model, "source", "the model")))
        check_token_ids(ids, self.model.config, self.model.tokenizer)
        return ids

    def generate(self, prompts, chat: bool | None = None, step_callback=None, **generation_overrides) -> GenerationOutput:
        """Decode one prompt or a batch (text, token ids or chat message lists) as one batch.
        `step_callback`, if given, is called after every step with a streaming.StepEvent (what the
        step committed); it costs one host read per step. Raising in it aborts the generation."""
        gen = self.recipe.generation
        if generation_overrides:  # validated as a recipe's generation keys
            gen = generation_with_overrides(gen, generation_overrides, self.recipe.source)
        ids = self.encode(prompts, chat)
        cfg = self.model.config
        longest = max(len(p) for p in ids)
        if longest + gen.gen_length > cfg.max_sequence_length:
            raise PromptError(f"prompt of {longest} tokens + gen_length {gen.gen_length} exceeds the model's "
                             f"max_sequence_length {cfg.max_sequence_length}")
        reporter = None
        if step_callback is not None:
            reporter = StepReporter(step_callback, self.model.tokenizer, self.model.config.stop_token_ids, gen.stop)
            self.manager.register(reporter, name=f"{reporter.name}_{id(reporter)}")
        try:
            with torch.inference_mode():
                state = denoise(self.model, ids, gen, self.manager.hook, executor=self.executor)
        finally:
            if reporter is not None:
                self.manager.unregister(reporter)
        return self._output(state, ids, gen)

    def stream(self, prompts, chat: bool | None = None, **generation_overrides) -> GenerationStream:
        """Like `generate`, but returns at once: iterate over the result for each step's StepEvent
        (decoding runs in a worker thread); its `output` is the GenerationOutput afterwards."""
        return GenerationStream(lambda on_step: self.generate(prompts, chat, step_callback=on_step,
                                                              **generation_overrides))

    def _output(self, state, ids, gen) -> GenerationOutput:
        stops = set(self.model.config.stop_token_ids)
        canvas = state.x[:, state.prompt_end:].tolist()
        answers = []
        for row in canvas:
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(row[:cut])
        state.stats.generated_tokens = [len(a) for a in answers]
        tok = self.model.tokenizer
        text = None
        if tok is not None:
            text = [_cut_at_stop(tok.decode(a, skip_special_tokens=True), gen.stop) for a in answers]
        return GenerationOutput(sequences=[p + row for p, row in zip(ids, canvas)], answers=answers, text=text,
                                stats=state.stats, unmask_step=state.unmask_step.tolist())


def _cut_at_stop(text: str, stops) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def generate(model, prompts, recipe=None, **generation_overrides) -> GenerationOutput:
    """One-shot: build a Pipeline for `recipe` (a Recipe, a dict, a YAML path, or None for the baseline
    recipe) and decode `prompts`; `chat=` as in `Pipeline.generate`."""
    return Pipeline(model, recipe).generate(prompts, **generation_overrides)
