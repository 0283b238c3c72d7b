"""The Python entry points: `Pipeline` (a model plus a recipe) and `generate`."""

from __future__ import annotations

import contextlib
import operator
import os
import threading
import weakref
from pathlib import Path

import attrs
import torch

from .config.loading import ConfigError, shown
from .config.recipe import Recipe, baseline_recipe, generation_with_overrides
from .core.loop import denoise
from .core.registry import make_manager
from .core.sampling import filters_apply
from .core.streaming import GenerationCancelled, GenerationStream, StepReporter
from .execution.executor import executor_for
from .models.memory import available_bytes, generation_bytes, gib, weights_bytes
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


class PipelineBusy(RuntimeError):
    """A generation started from inside another one on the same model (a step callback or a hook
    calling `generate`): it would wait for the running generation, which waits for it."""


class GenerationTooLarge(ValueError):
    """A generation whose estimated memory (activation store, logits, activations) exceeds what the
    model's device has available; the message gives the estimate by part."""


# decisions whose owners keep an activation store, and those that also track row fields in it
_STORE_DECISIONS = {"row_feed", "layer_rows", "kv_rows", "attn_rows", "ffn_rows"}
_FIELD_DECISIONS = {"layer_rows", "kv_rows", "attn_rows", "ffn_rows"}


class _Turns:
    """One generation at a time per model. The plugins keep per-generation state on their instances,
    a step reporter is registered on the pipeline's plugin manager, and the executor (its counters, in
    cuda_graphs mode its activation stores) belongs to the model: generations started together, from
    threads or open streams, on any pipelines sharing the model, wait for their turn."""

    def __init__(self):
        self._locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._owners: dict[int, int] = {}  # id(lock) -> the thread generating
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def take(self, model, cancelled: threading.Event | None = None):
        with self._guard:
            lock = self._locks.get(model)
            if lock is None:
                lock = self._locks[model] = threading.Lock()
        if self._owners.get(id(lock)) == threading.get_ident():
            raise PipelineBusy("this model is already generating in this thread (generate was called from a step "
                               "callback or a hook of another generation); start the second generation after the "
                               "first returns")
        acquired = False
        try:  # from the acquiring on: an interruption right after it still releases the lock
            while not (acquired := lock.acquire(timeout=0.05)):  # polled: a closed stream leaves at once
                if cancelled is not None and cancelled.is_set():
                    raise GenerationCancelled("the stream was closed")
            self._owners[id(lock)] = threading.get_ident()
            yield
        finally:
            if acquired:
                self._owners.pop(id(lock), None)
                lock.release()


_TURNS = _Turns()


class Pipeline:
    """A loaded model with a recipe's plugin stack; `generate` may be called any number of times.
    `recipe` is the recipe as it decodes on this model: the lengths it leaves unset are the model's
    (its generation_config.json) or the library defaults (config/generation.py). Generations on one
    model run one at a time: calls from several threads, and open streams, wait for their turn (their
    events and answers are their own)."""

    def __init__(self, model, recipe=None):
        recipe = _as_recipe(recipe)
        if isinstance(model, (str, os.PathLike)):  # a checkpoint directory or "default", loaded for the recipe
            from .models import load_model

            model = load_model(model, dtype=recipe.dtype, device=recipe.device)
        elif not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model = {shown(model)}: expected a model from load_model(), or a checkpoint directory "
                            f"(\"default\": the embedded model) to load")
        self.model = model
        self.recipe = recipe.for_model(model)
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
        if chat is not None and not isinstance(chat, bool):  # 'no' is truthy: no guessing
            raise TypeError(f"chat = {shown(chat)}: expected True, False or None")
        ids = encode_prompts(self.model.tokenizer, prompts, chat, source=str(getattr(self.model, "source", "the model")))
        check_token_ids(ids, self.model.config, self.model.tokenizer)
        return ids

    def generate(self, prompts, chat: bool | None = None, step_callback=None, seeds=None,
                 **generation_overrides) -> GenerationOutput:
        """Decode one prompt or a batch (text, token ids or chat message lists) as one batch.
        `step_callback`, if given, is called after every step with a streaming.StepEvent (what the
        step committed); it costs one host read per step. Raising in it aborts the generation.
        `seeds`: one sampling seed per prompt instead of generation.seed for all (each prompt decodes
        as it would alone with its seed, so prompts of different seeds share a batch)."""
        gen = self.recipe.generation
        if generation_overrides:  # validated as a recipe's generation keys
            gen = generation_with_overrides(gen, generation_overrides, self.recipe.source)
        ids = self.encode(prompts, chat)
        seeds = _per_prompt_seeds(seeds, len(ids))
        cfg = self.model.config
        longest = max(len(p) for p in ids)
        if longest + gen.gen_length > cfg.max_sequence_length:
            raise PromptError(f"prompt of {longest} tokens + gen_length {gen.gen_length} exceeds the model's "
                             f"max_sequence_length {cfg.max_sequence_length}")
        with _TURNS.take(self.model, getattr(step_callback, "cancelled", None)):
            self._check_memory(ids, gen)
            reporter = None
            if step_callback is not None:
                reporter = StepReporter(step_callback, self.model.tokenizer, self.model.config.stop_token_ids, gen.stop)
                self.manager.register(reporter, name=f"{reporter.name}_{id(reporter)}")
            try:
                with torch.inference_mode():
                    state = denoise(self.model, ids, gen, self.manager.hook, seed=seeds, executor=self.executor)
            finally:
                if reporter is not None:
                    self.manager.unregister(reporter)
            return self._output(state, ids, gen)

    def stream(self, prompts, chat: bool | None = None, seeds=None, **generation_overrides) -> GenerationStream:
        """Like `generate`, but returns at once: iterate over the result for each step's StepEvent
        (decoding runs in a worker thread, after any generation running on the model); its `output` is
        the GenerationOutput afterwards."""
        return GenerationStream(lambda on_step: self.generate(prompts, chat, step_callback=on_step, seeds=seeds,
                                                              **generation_overrides))

    def _check_memory(self, ids, gen) -> None:
        """Refuse a generation whose estimated memory exceeds what the device has available, before
        anything is allocated (`models/memory.py`)."""
        model = self.model
        provided = set().union(*(p.provides for p in self.plugins))
        batch, length = len(ids), max(len(p) for p in ids) + gen.gen_length
        model_batch = batch * (2 if gen.cfg_scale > 0 else 1)
        kept = self.executor.mode == "cuda_graphs" and self.executor.holds_store(model_batch, length)
        parts = generation_bytes(model.config, model.dtype, batch=batch, model_batch=model_batch, length=length,
                                 block_length=gen.block_length, store=bool(provided & _STORE_DECISIONS) and not kept,
                                 fields=_store_fields(self.plugins), temperature=gen.temperature,
                                 filtered=filters_apply(model.config.family, gen.temperature, gen.top_p, gen.top_k))
        needed, available = sum(parts.values()), available_bytes(model.device)
        if available is None or needed <= available:
            return
        detail = ", ".join(f"{name} {gib(n)}" for name, n in parts.items())
        raise GenerationTooLarge(
            f"a generation of {batch} prompt{'s' if batch > 1 else ''} x {length} columns (longest prompt "
            f"{length - gen.gen_length} + gen_length {gen.gen_length}) needs about {gib(needed)} ({detail}) but "
            f"{model.device} has {gib(available)} available (the weights, already loaded, take "
            f"{gib(weights_bytes(model.config, model.dtype))}); decode fewer prompts at once or a shorter gen_length")

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


def _store_fields(plugins) -> int:
    """The d_model-wide fields per layer the plugins keep in the activation store: those they declare
    (Plugin.store_fields; a name two declare is one tensor), and two for a plugin that owns a layer
    decision without declaring them."""
    declared = frozenset().union(*(p.store_fields or () for p in plugins))
    undeclared = any(p.store_fields is None and p.provides & _FIELD_DECISIONS for p in plugins)
    return len(declared) + (2 if undeclared else 0)


def _per_prompt_seeds(seeds, prompts: int) -> list[int] | None:
    """`seeds` as a list of one whole number per prompt (None: generation.seed for all)."""
    if seeds is None:
        return None
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise TypeError(f"seeds = {shown(seeds)}: expected a list of one seed (a whole number) per prompt")
    seeds = list(seeds)
    try:
        if len(seeds) != prompts or any(isinstance(s, bool) for s in seeds):
            raise TypeError
        return [operator.index(s) for s in seeds]  # numpy and 0-d tensor integers too, as token ids
    except TypeError:
        raise ValueError(f"seeds = {shown(seeds)}: expected {prompts} whole number(s), one per prompt") from None


def _cut_at_stop(text: str, stops) -> str:
    """`text` up to the earliest stop string (as a stream ends it), whichever stop string that is."""
    hit = min((text.index(s) for s in stops if s and s in text), default=None)
    return text if hit is None else text[:hit]


def generate(model, prompts, recipe=None, **generation_overrides) -> GenerationOutput:
    """One-shot: build a Pipeline for `recipe` (a Recipe, a dict, a YAML path, or None for the baseline
    recipe) and decode `prompts`; `chat=` and `seeds=` as in `Pipeline.generate`."""
    return Pipeline(model, recipe).generate(prompts, **generation_overrides)
