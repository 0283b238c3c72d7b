"""The lm-eval model `dare`: any recipe's decoding behind lm-eval's `generate_until`, and a Monte
Carlo likelihood estimate (LLaDA's) behind `loglikelihood` / `loglikelihood_rolling`.

    lm_eval --model dare --model_args recipe=recipes/baseline.yaml,gen_length=64 --tasks ...

model_args (all optional):
    recipe        recipe YAML path, a Recipe or a dict (default: the baseline recipe)
    model         checkpoint directory or "default" (overrides the recipe's model; alias: pretrained)
    dtype, device override the recipe's (a CUDA device on a machine without CUDA falls back to the
                  recipe's device with a warning, since lm-eval's CLI passes --device cuda:0 by default)
    batch_size    prompts decoded together (lm-eval's --batch_size; "auto" = max_batch_size or 16)
    set           recipe overrides "key.path=value", several separated by ";" (or a list from Python)
    <any generation key>  shortcut for set=generation.<key>=<value>: gen_length, block_length, steps,
                  temperature, remasking, cfg_scale, seed, ...
    mc_samples    Monte Carlo samples per loglikelihood request (default 32)
    mc_batch_size forward batch for those samples (default: mc_samples)
    add_bos_token prepend the tokenizer's BOS to every context (default False)
    data_parallel "auto" (default): under torchrun / accelerate launch (WORLD_SIZE > 1) join the
                  process group and let lm-eval's evaluator split the problems over the ranks;
                  false: one process decodes everything it is given, whatever the launcher
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..api import Pipeline
from ..config.recipe import GenerationConfig, Recipe, baseline_recipe
from ..core.hookspecs import hookimpl
from ..reuse import flops as flops_mod
from . import distributed

log = logging.getLogger(__name__)

GENERATION_KEYS = tuple(a.name for a in attrs.fields(GenerationConfig))
SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int}  # applied only with do_sample=true
# keys lm-eval itself may put into model_args; accepted and ignored
_IGNORED_ARGS = ("trust_remote_code", "parallelize", "max_length")


def cut_at_stops(text: str, stops) -> str:
    """`text` up to the earliest occurrence of any stop string (empty strings ignored)."""
    cut = len(text)
    for s in stops or ():
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _split_set(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(";") if v.strip()]
    return [str(v) for v in value]


def _resolve_device(requested, fallback: str) -> str:
    if requested is None:
        return fallback
    requested = str(requested)
    if requested.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is not available; using the recipe's device %r",
                    requested, fallback)
        return fallback
    return requested


def _parse_data_parallel(value) -> bool | None:
    """model_args `data_parallel`: None / "auto" -> None (decide from the launcher), else a bool."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"dare: data_parallel={value!r}: expected auto, true or false")


def padding_positions(requests) -> dict[int, int]:
    """Positions of the requests lm-eval's evaluator added as padding, mapped to the position of
    the request they copy. With several ranks it pads a rank's list with its last request (the same
    Instance object, `repeats` times per copy) so that every rank runs as many requests; an
    Instance present more than its `repeats` times is padding."""
    seen: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        seen.setdefault(id(req), []).append(i)
    pad = {}
    for positions in seen.values():
        repeats = max(int(getattr(requests[positions[0]], "repeats", 1) or 1), 1)
        for i in positions[repeats:]:
            pad[i] = positions[0]
    return pad


# plugin numbers whose name says they are a fraction, a rate or a setting (reuse_fraction, threshold,
# row_budget): averaged over generations, weighted by prompts; `min_...`: the least of any generation;
# every other number is a count and summed
_MEAN_WORDS = ("fraction", "ratio", "rate", "mean", "avg", "threshold", "interval")


def _is_mean(key: str) -> bool:
    key = key.lower()
    return any(w in key for w in _MEAN_WORDS) or key.endswith(("reuse", "row_budget"))


def _is_minimum(key: str) -> bool:
    return key.lower().startswith("min_")


def least_values(values: list):
    """The least of several ranks' or batches' values: dicts key by key (recursively), numbers: their minimum."""
    if isinstance(values[0], dict):
        keys = dict.fromkeys(k for v in values for k in (v or {}))
        return {k: least_values([v[k] for v in values if k in (v or {})]) for k in keys}
    return min(values)


def _add_to(table: dict, name: str, key: str, value) -> None:
    """table[name][key] += value, both levels created on first use."""
    row = table.setdefault(name, {})
    row[key] = row.get(key, 0) + value


def _merge_values(values: list):
    """Sum numbers; dicts key by key (recursively); anything else: the first rank's."""
    first = values[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values for k in (v or {}))
        return {k: _merge_values([v[k] for v in values if k in (v or {})]) for k in keys}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return sum(values)
    return first


@attrs.define
class DecodingStats:
    """Decoding counters summed over every generate_until batch of a run.

    With data parallelism `merged` combines the ranks' counters: counts are summed, the times
    (`_MAX_FIELDS`) are the slowest rank's, since the ranks decode at the same time."""

    _MAX_FIELDS = ("decode_time_s", "wall_time_s", "loglikelihood_time_s")
    _MIN_FIELDS = ("plugin_minima",)  # merged (and resumed from a journal) by their minimum
    _LOCAL_FIELDS = ()  # fields that stay this process's (callables, configs)

    requests: int = 0
    batches: int = 0
    nfe_total: int = 0  # model forwards executed (a batch forward counts once)
    nfe_request_sum: int = 0  # sum over requests of the forwards of the batch that decoded it
    steps: int = 0
    generated_tokens: int = 0  # answer tokens before the first stop token, summed over requests
    decode_time_s: float = 0.0  # the denoising loops themselves
    decode_cpu_s: float = 0.0  # process CPU time (every thread) over the generate calls
    wall_time_s: float = 0.0  # generate_until batches end to end (tokenizing and decoding text included)
    # numeric plugin counters by plugin and name (`plugin_summary` puts them together): counts summed;
    # fractions and settings as sums weighted by prompts, and those weights; minima
    plugin_counts: dict = attrs.Factory(dict)
    plugin_mean_sums: dict = attrs.Factory(dict)
    plugin_weights: dict = attrs.Factory(dict)
    plugin_minima: dict = attrs.Factory(dict)
    flops: dict = attrs.Factory(dict)  # FLOPs by operation (reuse/flops.py), from the rows each layer computed
    loglikelihood_requests: int = 0
    loglikelihood_forwards: int = 0  # rows scored by the Monte Carlo estimate (each a full forward)
    loglikelihood_time_s: float = 0.0
    ranks: int = 1  # processes whose counters these are (data parallelism)

    def counters(self) -> dict:
        """The mergeable fields, as plain data (what the ranks exchange)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(type(self)) if f.name not in self._LOCAL_FIELDS}

    def merged(self, parts: list[dict]):
        """A copy holding the counters of every rank (`parts`: each rank's `counters()`)."""
        values = {}
        for name in parts[0]:
            column = [p[name] for p in parts]
            values[name] = (max(column) if name in self._MAX_FIELDS else least_values(column) if name in self._MIN_FIELDS
                            else _merge_values(column))
        return attrs.evolve(self, **values)

    def add(self, stats, size: int, wall: float, cpu: float = 0.0) -> None:
        self.decode_cpu_s += cpu
        self.requests += size
        self.batches += 1
        self.nfe_total += stats.nfe
        self.nfe_request_sum += stats.nfe * size
        self.steps += stats.steps
        self.generated_tokens += stats.total_generated
        self.decode_time_s += stats.wall_time_s
        self.wall_time_s += wall
        for name, counters in (stats.plugins or {}).items():
            for key, value in (counters or {}).items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if _is_minimum(key):
                    least = self.plugin_minima.setdefault(name, {})
                    least[key] = min(least.get(key, value), value)
                elif _is_mean(key):
                    _add_to(self.plugin_mean_sums, name, key, value * size)
                    _add_to(self.plugin_weights, name, key, size)
                else:
                    _add_to(self.plugin_counts, name, key, value)

    def plugin_summary(self) -> dict:
        """The plugins' numbers over the run: counts summed, fractions and settings averaged over
        generations (weighted by prompts), `min_...` the least."""
        out: dict = {}
        for name, counts in self.plugin_counts.items():
            out.setdefault(name, {}).update(counts)
        for name, sums in self.plugin_mean_sums.items():
            for key, total in sums.items():
                out.setdefault(name, {})[key] = total / self.plugin_weights[name][key]
        for name, least in self.plugin_minima.items():
            out.setdefault(name, {}).update(least)
        return out

    def to_dict(self) -> dict:
        n = max(self.requests, 1)
        return {
            "requests": self.requests,
            "batches": self.batches,
            "nfe_total": self.nfe_total,
            "nfe_per_request": self.nfe_request_sum / n if self.requests else 0.0,
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "generated_tokens_per_request": self.generated_tokens / n if self.requests else 0.0,
            "decode_time_s": round(self.decode_time_s, 6),
            "decode_cpu_s": round(self.decode_cpu_s, 6),
            "wall_time_s": round(self.wall_time_s, 6),
            "tokens_per_second": round(self.generated_tokens / self.decode_time_s, 3) if self.decode_time_s else 0.0,
            "plugins": self.plugin_summary(),
            "flops": dict(self.flops),
            "loglikelihood_requests": self.loglikelihood_requests,
            "loglikelihood_forwards": self.loglikelihood_forwards,
            "loglikelihood_time_s": round(self.loglikelihood_time_s, 6),
            "ranks": self.ranks,
        }


def build_recipe(recipe=None, overrides=(), **generation) -> Recipe:
    """The recipe of a model_args set: a path / Recipe / dict (None = baseline settings), then the
    generation shortcuts, then the `set` overrides."""
    if recipe is None:
        base = baseline_recipe()
    elif isinstance(recipe, Recipe):
        base = recipe
    elif isinstance(recipe, dict):
        base = Recipe.from_dict(recipe)
    else:
        base = Recipe.from_yaml(Path(recipe))
    if not generation and not overrides:
        return base
    # the shortcuts are overrides like `set`'s: a recipe's steps follow a gen_length given here
    shortcuts = [f"generation.{key}={json.dumps(value)}" for key, value in generation.items()]
    return base.with_overrides(shortcuts + list(overrides))


class _FlopsCounter:
    """Registered on the model's plugin manager: adds each generation's estimated FLOPs (from the
    rows each layer really computed, plus what other models a plugin ran computed: a guide's
    forwards) to the model's DecodingStats. Observes, decides nothing."""

    def __init__(self, lm):
        self.lm = lm

    @hookimpl
    def dare_generation_end(self, state):
        head_rows = state.stats.nfe * state.model_batch * state.gen.block_length
        estimated = flops_mod.estimate(self.lm.config, state.stats.layer_rows, state.length, head_rows)
        self.lm.stats.flops = flops_mod.add(self.lm.stats.flops, flops_mod.with_extra(estimated, state.stats.extra_flops))


@register_model("dare")
class DareLM(TemplateLM):
    """A dare-pipeline Pipeline (model + recipe) as an lm-eval model.

    Under torchrun / accelerate launch (unless data_parallel=false) it is one rank of a
    data-parallel group: `rank` / `world_size` tell lm-eval's evaluator to give it every W-th
    problem, and `all_gather` / `gather_object` / `barrier` are the collectives the evaluator uses
    to gather the scores on rank 0 (see distributed.py)."""

    def __init__(self, recipe=None, model=None, pretrained=None, dtype=None, device=None, batch_size=1,
                 max_batch_size=None, mc_samples: int = 32, mc_batch_size: int | None = None,
                 add_bos_token: bool = False, data_parallel=None, **kwargs):
        super().__init__()
        overrides = _split_set(kwargs.pop("set", None))  # "set" is a model_args key, not a Python name here
        generation = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_KEYS}
        for k in _IGNORED_ARGS:
            kwargs.pop(k, None)
        if kwargs:
            raise ValueError(f"dare: unknown model_args {sorted(kwargs)}; accepted: recipe, model, dtype, device, "
                             f"batch_size, set, mc_samples, mc_batch_size, add_bos_token, data_parallel and the generation keys "
                             f"{list(GENERATION_KEYS)}")
        if isinstance(generation.get("stop"), str):
            generation["stop"] = [generation["stop"]]
        recipe = build_recipe(recipe, overrides, **generation)
        model = model if model is not None else pretrained
        changes = {}
        if isinstance(model, (str, Path)):
            changes["model"] = str(model)
        if dtype is not None:
            changes["dtype"] = str(dtype)
        resolved_device = _resolve_device(device, recipe.device)
        data_parallel = _parse_data_parallel(data_parallel)
        if data_parallel is not False and (distributed.is_active() or distributed.launched_world_size() > 1):
            # one process per GPU (cuda:LOCAL_RANK); lm-eval's evaluator splits the problems by rank
            if model is None or isinstance(model, (str, Path)):
                resolved_device = distributed.device_for_rank(resolved_device)
                self._rank, self._world_size = distributed.init(resolved_device)
            else:  # a loaded model stays where the caller put it
                self._rank, self._world_size = distributed.init(str(model.device))
        if resolved_device != recipe.device:
            changes["device"] = resolved_device
        if changes:
            recipe = Recipe.from_dict({**recipe.to_dict(), **changes}, source=recipe.source)
        if model is None or isinstance(model, (str, Path)):
            self.pipeline = Pipeline.from_recipe(recipe)
        else:  # an already loaded DiffusionTransformer (Python API)
            self.pipeline = Pipeline(model, recipe)
        self.recipe = self.pipeline.recipe  # with the model's answer length where the recipe leaves it
        self.model = self.pipeline.model
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"dare: the checkpoint {self.model.source} has no tokenizer; lm-eval works on text")
        self.config = self.model.config
        self._device = self.model.device
        self.batch_size = self._batch_size(batch_size, max_batch_size)
        self.mc_samples = int(mc_samples)
        self.mc_batch_size = int(mc_batch_size or mc_samples)
        if self.mc_samples < 1 or self.mc_batch_size < 1:
            raise ValueError("dare: mc_samples and mc_batch_size must be >= 1")
        self.add_bos_token = bool(add_bos_token)
        self.stats = DecodingStats()
        self._warned: set[str] = set()
        self.pipeline.manager.register(_FlopsCounter(self), name="lm_eval_flops_counter")
        DareLM.last_recipe_name = recipe.name  # lm_eval_cli names lm-eval's results after it

    last_recipe_name: str | None = None  # the recipe of the latest DareLM built in this process
    show_progress = True  # draw the decoding's progress bars (`dare-pipeline eval`: only on a terminal)
    _merged_stats = None  # with data parallelism: every rank's counters, merged after generate_until

    @staticmethod
    def _batch_size(batch_size, max_batch_size) -> int:
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            size = int(max_batch_size or 16)
            log.info("dare: batch_size %r -> %d (no memory probing; set batch_size explicitly)", batch_size, size)
            return size
        size = int(batch_size if batch_size is not None else 1)
        if size < 1:
            raise ValueError(f"dare: batch_size must be >= 1, got {batch_size!r}")
        return size

    # ---- data parallelism: what lm-eval's evaluator calls when world_size > 1 -------------------
    def all_gather(self, tensor):
        if self.world_size <= 1:
            return tensor
        return distributed.all_gather_tensor(tensor.to(self.device))

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        return distributed.gather_object(obj, dst=dst)

    def barrier(self) -> None:
        if self.world_size > 1:
            distributed.barrier()

    def gathered_stats(self) -> DecodingStats:
        """`stats` of every rank merged (counts summed, times the slowest rank's); `stats` itself
        with one process. Collective: with several ranks, every rank must call it."""
        if self.world_size <= 1:
            return self.stats
        return self.stats.merged(distributed.all_gather_object(self.stats.counters()))

    def _on_every_rank(self, fn, requests, what: str, **kwargs) -> list:
        """fn(requests) for this rank's share. With several ranks, the evaluator's padding copies
        are not decoded again (they get their original's result and do not count in the stats),
        and a failure on any rank raises on every rank (see distributed.agree)."""
        if self.world_size <= 1:
            return fn(requests, **kwargs)

        def decode_share():
            pad = padding_positions(requests)
            keep = [i for i in range(len(requests)) if i not in pad]
            results = [None] * len(requests)
            for i, value in zip(keep, fn([requests[i] for i in keep], **kwargs)):
                results[i] = value
            for i, source in pad.items():
                results[i] = results[source]
            return results

        return distributed.together(decode_share, what)

    # ---- what lm-eval asks of a model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return eos if eos is not None else self.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.config.max_sequence_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.model.source).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def get_model_info(self) -> dict:
        """What lm-eval puts into its results' `config` (rank 0, at the end of an evaluation): the
        recipe and model, and the decoding statistics (NFE, tokens/s, FLOPs, plugin counters) of
        this process's generate_until requests, every rank's merged with data parallelism."""
        stats = self._merged_stats if self._merged_stats is not None else self.stats
        return {"dare_recipe": self.recipe.name, "dare_model": str(self.model.source),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "model_family": self.config.family,
                "dare_decoding": stats.to_dict()}

    # ---- generate_until -----------------------------------------------------------------------
    def _generation_overrides(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """lm-eval gen_kwargs -> (GenerationConfig overrides, stop strings)."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        overrides = {}
        # the recipe decides how to decode: a task's do_sample=false does not turn a sampling recipe
        # greedy; an explicit temperature, top_p or top_k with do_sample=true does override it (as in
        # transformers, they mean nothing to a task that does not sample)
        do_sample = kw.pop("do_sample", None)
        for key, kind in SAMPLING_KEYS.items():
            value = kw.pop(key, None)
            if do_sample and value is not None:
                overrides[key] = kind(value)
        for key in list(kw):
            if key in GENERATION_KEYS:
                value = kw.pop(key)
                overrides[key] = tuple(value) if key == "stop" else value
        kw.pop("max_gen_toks", None)  # the recipe's gen_length sizes the canvas
        if "max_gen_toks" in (gen_kwargs or {}) and "max_gen_toks" not in self._warned:
            self._warned.add("max_gen_toks")
            log.info("dare: max_gen_toks is ignored; the answer length is the recipe's gen_length")
        for key in sorted(kw):
            if key not in self._warned:
                self._warned.add(key)
                log.warning("dare: generation kwarg %r is not supported and is ignored", key)
        return overrides, until

    def _fit(self, ids: list[int], gen_length: int) -> list[int]:
        room = self.config.max_sequence_length - gen_length
        if room < 1:
            raise ValueError(f"dare: gen_length {gen_length} leaves no room for a prompt within "
                             f"max_sequence_length {self.config.max_sequence_length}")
        if not ids:
            ids = [self.prefix_token_id]
        if len(ids) > room:
            if "truncate" not in self._warned:
                self._warned.add("truncate")
                log.warning("dare: contexts longer than %d tokens are cut from the left", room)
            ids = ids[-room:]
        return ids

    def _no_bar(self, disable_tqdm: bool) -> bool:
        return disable_tqdm or self.rank != 0 or not self.show_progress

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = self._on_every_rank(self._generate_until, requests, "generate_until", disable_tqdm=disable_tqdm)
        if self.world_size > 1:  # every rank is here: merge now, for get_model_info on rank 0 alone
            self._merged_stats = self.gathered_stats()
        return out

    def _generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1] or {}, sort_keys=True, default=repr)
            groups.setdefault(key, []).append(i)
        # closed on the way out of an interruption too, before the command prints its last line
        with tqdm(total=len(requests), disable=self._no_bar(disable_tqdm), desc="dare generate_until") as bar:
            for indices in groups.values():
                gen_kwargs = requests[indices[0]].args[1]
                overrides, until = self._generation_overrides(gen_kwargs)
                gen = attrs.evolve(self.recipe.generation, **overrides)
                # longest first: padding waste stays low and a too-long batch fails at once
                order = sorted(indices, key=lambda i: -len(requests[i].args[0]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    texts = self._decode_batch([requests[i].args[0] for i in chunk], gen_kwargs, gen, overrides, until)
                    for i, text in zip(chunk, texts):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return results

    def _decode_batch(self, contexts: list[str], gen_kwargs, gen, overrides: dict, until: list[str]) -> list[str]:
        """The answers to one batch of contexts (decoded together), its counters added to `stats`.
        gen_kwargs: the task's generation arguments as lm-eval gave them (what identifies the batch
        to a subclass that keeps a record of it, see ablation/measure.py)."""
        prompts = [self._fit(self.tok_encode(c), gen.gen_length) for c in contexts]
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = self.pipeline.generate(prompts, **overrides)
        cpu = time.process_time() - cpu0
        texts = [cut_at_stops(self.tok_decode(a), list(gen.stop) + until) for a in out.answers]
        self.stats.add(out.stats, len(contexts), time.perf_counter() - t0, cpu)
        return texts

    # ---- likelihoods (Monte Carlo, as in the LLaDA paper) ------------------------------------
    def _logits(self, x: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Per-position logits (float32) predicting each column of x; classifier-free guidance as in
        decoding when the recipe sets cfg_scale (the unconditional input masks the prompt)."""
        cfg_scale = self.recipe.generation.cfg_scale
        if cfg_scale > 0:
            uncond = x.clone()
            uncond[:, :prompt_len] = self.config.mask_token_id
            both = self.model(torch.cat([x, uncond])).float()
            cond, un = both.chunk(2)
            logits = un + (cfg_scale + 1) * (cond - un)
        else:
            logits = self.model(x).float()
        if self.config.logits_shift:  # Dream: row i predicts token i+1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def _generator(self, tokens: list[int]) -> torch.Generator:
        import hashlib

        digest = hashlib.sha256(json.dumps([self.recipe.generation.seed, tokens]).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))

    @torch.inference_mode()
    def score_continuation(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Monte Carlo estimate of log p(continuation | context) and a one-step greedy check.

        Each of `mc_samples` samples masks l of the L continuation tokens (l stratified over 1..L as
        in LLaDA's evaluation code) and scores the masked ones: sum of cross-entropies / (l / L).
        The negated mean is an unbiased estimate of the ELBO, a lower bound of the log-likelihood,
        exact for a one-token continuation. `is_greedy`: with the whole continuation masked, every
        position's argmax is the continuation token (one forward, not a full decode)."""
        if not continuation:
            return 0.0, True
        limit = self.config.max_sequence_length
        if len(continuation) >= limit:
            raise ValueError(f"dare: continuation of {len(continuation)} tokens does not fit max_sequence_length "
                             f"{limit}")
        context = (context or [self.prefix_token_id])[-(limit - len(continuation)):]
        seq = torch.tensor(context + continuation, device=self.device)
        p, length, n = len(context), len(continuation), self.mc_samples
        gen = self._generator(context + continuation)
        k = int(torch.randint(1, length + 1, (1,), generator=gen))
        counts = torch.round(torch.linspace(float(k), k + (n - 1) * (length / n), n)).long()
        counts = (counts - 1) % length + 1  # masked tokens per sample, 1..L
        target = seq[p:]
        total = 0.0
        for start in range(0, n, self.mc_batch_size):
            c = counts[start:start + self.mc_batch_size]
            ranks = torch.rand(len(c), length, generator=gen).argsort(-1).argsort(-1)
            masked = (ranks < c[:, None]).to(self.device)
            x = seq.repeat(len(c), 1)
            x[:, p:] = torch.where(masked, self.config.mask_token_id, x[:, p:])
            logits = self._logits(x, p)[:, p:]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.repeat(len(c)), reduction="none")
            ce = (ce.view(len(c), length) * masked).sum(-1)
            total += float((ce / (c.to(ce.device).float() / length)).sum())
        self.stats.loglikelihood_forwards += n + 1
        x = seq[None].clone()
        x[0, p:] = self.config.mask_token_id
        greedy = bool((self._logits(x, p)[0, p:].argmax(-1) == target).all())
        return -total / n, greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._on_every_rank(super().loglikelihood, requests, "loglikelihood", disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        t0 = time.perf_counter()
        for (text_pair, context, continuation) in tqdm(requests, disable=self._no_bar(disable_tqdm),
                                                        desc="dare loglikelihood"):
            result = self.score_continuation(list(context), list(continuation))
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", text_pair, result)
        self.stats.loglikelihood_requests += len(requests)
        self.stats.loglikelihood_time_s += time.perf_counter() - t0
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Monte Carlo ELBO of each whole string, in disjoint windows of at most max_sequence_length
        tokens, each conditioned on the tokens before it (or the prefix token for the first)."""
        return self._on_every_rank(self._loglikelihood_rolling, requests, "loglikelihood_rolling",
                                   disable_tqdm=disable_tqdm)

    def _loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils as lm_utils

        out = []
        t0 = time.perf_counter()
        for req in tqdm(requests, disable=self._no_bar(disable_tqdm), desc="dare loglikelihood_rolling"):
            (string,) = req.args
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self.score_continuation(list(ctx), list(cont))[0] for ctx, cont in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        self.stats.loglikelihood_requests += len(requests)
        self.stats.loglikelihood_time_s += time.perf_counter() - t0
        return out
