"""Guided diffusion (FlashDLM: Hu, Meng et al. 2025, arXiv 2505.21467): a small autoregressive model,
the guide, decides how many of the diffusion model's drafts to commit at once.

At every forward the diffusion model drafts every masked column of the block (the proposal's
tokens). The guide reads the committed prefix and the drafts in one teacher-forced forward and
checks them left to right from the first masked column: the longest run it agrees with is
committed, the first disagreement ends the run, and committed tokens are always the diffusion
model's drafts (the guide only says how many). When the run is empty the fall-back commits one
token, so every forward makes progress. The guide keeps a KV cache of the committed prefix
(transformers' DynamicCache), so a check costs a forward over the drafts only.

The rule follows the authors' code (`assisted` mode, `ARAssistant`); the choices it leaves open
and the ones taken here are in docs/guided.md:
- agreement (`accept`): `argmax` (the draft is the guide's most likely token: `deterministic`),
  `top_k_relative` (the draft is among the guide's `top_k` and has at least `relative` times the
  top probability: `topk_relative`, their GSM8K setting k = 2, 0.5), or `min_prob` (the guide gives
  the draft at least `min_prob`). Ties agree: a draft that shares the top logit is the argmax;
- the run is contiguous from each row's first masked column and stays inside the block; it is
  verified in chained windows of `verify_window` columns (another guide forward only when some row
  accepted the whole window);
- fall-back (`fallback`): `first` (the draft of the first masked column, the reference's) or
  `confident` (the most confident candidate);
- `stop_at_eos`: once an answer has a committed stop token, every masked column after it becomes
  EOS (`DecodeState.fill_after_stop`), so the blocks after the answer take no forward;
- `also_commit_above`: also commit any candidate whose diffusion probability reaches this value
  (Fast-dLLM's threshold rule joined to the guided run; threshold_decoding and this plugin both
  own `commit_policy`, so they cannot be listed together).

The guide is `default` (the embedded guide of the embedded models, in dare_pipeline/models/default/guide)
or a local Hugging Face causal-LM directory, loaded offline with AutoModelForCausalLM once per
plugin instance, on the diffusion model's device and in its dtype unless `dtype` says otherwise.
Its vocabulary must be the diffusion model's: only the diffusion model's own special tokens may be
missing from it (Dream's `<|mask|>` and `<|beginoftext|>`, so that a Qwen2.5 model can guide
Dream). It runs eagerly whatever the executor's mode (the diffusion model may be compiled).

Batches: prompts are left-padded to one prompt end, so one cache serves the batch; a row whose
block is done is still fed (its results are unused). Agreement depends only on a row's own tokens
and is decided in float32 with ties agreeing, so a prompt decodes the same alone and in a batch.

Stats (under `guided_diffusion`): guide, guide_execution ("eager"), guide_forwards, guide_rows
(fed columns x batch rows), guide_flops (also in `stats.extra_flops["guide"]`, which reports'
FLOPs totals include), drafted (masked candidates the diffusion model drafted), verified (drafts
the guide checked), accepted (drafts committed by agreement), fallbacks (rows x forwards that
accepted nothing), threshold_commits (`also_commit_above`), eos_filled, accepted_per_forward_mean
and fallback_rate (per row and forward with a candidate).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch

from dare_pipeline.config import ConfigError, at_least, choice, in_range
from dare_pipeline.core import Plugin, hookimpl
from dare_pipeline.models.default import GUIDE

NAME = "guided_diffusion"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config attributes the FLOPs count reads (a decoder of the Llama layout: Llama, Qwen2, Mistral, ...)
LAYOUT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def embedded_guide() -> Path:
    """The embedded guide's directory (beside the embedded diffusion weights)."""
    return GUIDE


def _guide_dir(instance, attribute, value):
    if value == "default":
        return
    path = Path(value).expanduser()
    allowed = "a local Hugging Face causal-LM directory, or 'default' for the embedded guide"
    if not path.is_dir():
        raise ValueError(f"{attribute.name} = {value!r}: not a directory ({allowed})")
    if not (path / "config.json").is_file():
        raise ValueError(f"{attribute.name} = {value!r}: no config.json in {path} ({allowed})")


def _torch_device(instance, attribute, value):
    if value is None:
        return
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{attribute.name} = {value!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None


def _optional(validator):
    return attrs.validators.optional(validator)


@attrs.frozen(kw_only=True)
class GuidedOptions:
    guide: str = attrs.field(default="default", validator=_guide_dir)
    device: str | None = attrs.field(default=None, validator=_torch_device)  # must be the diffusion model's
    dtype: str | None = attrs.field(default=None, validator=_optional(choice(*DTYPES)))
    accept: str = attrs.field(default="argmax", validator=choice("argmax", "top_k_relative", "min_prob"))
    top_k: int = attrs.field(default=2, validator=at_least(1))
    relative: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0))
    min_prob: float = attrs.field(default=0.1, validator=in_range(0.0, 1.0))
    fallback: str = attrs.field(default="first", validator=choice("first", "confident"))
    verify_window: int = attrs.field(default=32, validator=at_least(1))
    stop_at_eos: bool = True
    also_commit_above: float | None = attrs.field(default=None, validator=_optional(in_range(0.0, 1.0)))


class Guide:
    """A loaded guide: the transformers model, the names its forward takes, and the FLOPs of a forward."""

    def __init__(self, model, source: str):
        self.model = model
        self.source = source
        params = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"  # transformers 5 / 4
        self.keep_key = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        cfg = model.config
        self.d = cfg.hidden_size
        self.layers = cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_dim = cfg.num_attention_heads * head_dim
        self.kv_dim = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head_dim
        self.ffn = cfg.intermediate_size
        self.vocab = cfg.vocab_size

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def forward(self, tokens, attention_mask, positions, cache, keep: int) -> torch.Tensor:
        """Logits (B, keep, V) of the last `keep` fed columns, extending `cache`."""
        kwargs = {self.cache_key: cache}
        if self.keep_key is not None:
            kwargs[self.keep_key] = keep
        out = self.model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                         **kwargs)
        return out.logits[:, -keep:]

    def flops(self, batch: int, past: int, fed: int, head_rows: int) -> int:
        """Matrix FLOPs of one forward over `fed` columns after `past` cached ones (a multiply-add is
        2; per fed row and layer: q, k, v and o projections, gated MLP, scores and weighted values
        over all past + fed keys, as the attention kernel computes them under a causal mask, padding
        included), plus `head_rows` LM-head rows, for `batch` rows."""
        d, q, kv = self.d, self.q_dim, self.kv_dim
        layer = fed * (2 * d * q + 4 * d * kv + 2 * q * d + 6 * d * self.ffn) + 4 * q * fed * (past + fed)
        return batch * (self.layers * layer + 2 * d * self.vocab * head_rows)


def load_guide(options: GuidedOptions, model) -> Guide:
    """The guide of `options` for diffusion model `model`, checked: device, layout, vocabulary."""
    where = f"plugins.{NAME}.guide = {options.guide!r}"
    directory = embedded_guide() if options.guide == "default" else Path(options.guide).expanduser()
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json in {directory} (a local Hugging Face causal-LM directory, "
                          f"or 'default' for the embedded guide)")
    device = model.device
    if options.device is not None and not _same_device(torch.device(options.device), device):
        raise ConfigError(f"plugins.{NAME}.device = {options.device!r}: the guide must run on the diffusion "
                          f"model's device ({device}); leave it unset or set it to {str(device)!r}")
    dtype = DTYPES[options.dtype] if options.dtype else model.dtype
    guide_model = _from_pretrained(directory, where)
    missing = [k for k in LAYOUT if not isinstance(getattr(guide_model.config, k, None), int)]
    if missing:
        raise ConfigError(f"{where}: {directory}/config.json has no {missing}: the guide must be a decoder of the "
                          f"Llama layout (Llama, Qwen2, Mistral, ...), whose FLOPs are counted")
    check_vocabulary(_guide_tokenizer(directory, where), guide_model.config.vocab_size, model, directory)
    with torch.inference_mode(False):
        guide_model = guide_model.to(device=device, dtype=dtype)
    return Guide(guide_model.eval().requires_grad_(False), "default" if options.guide == "default" else str(directory))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def _quiet_progress():
    """No progress bar of transformers (loading or saving weights) on stderr (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _from_pretrained(directory: Path, where: str):
    from transformers import AutoModelForCausalLM

    try:
        # outside inference mode: the parameters must be ordinary tensors, whoever loads first
        with torch.inference_mode(False), _quiet_progress():
            return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for one broken directory
        message = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{where}: cannot load a causal LM from {directory} ({type(exc).__name__}: {message})") from exc


def _guide_tokenizer(directory: Path, where: str):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer, PretrainedConfig

    try:  # an empty config: the tokenizer's class comes from tokenizer_config.json, as the model loader reads it
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, config=PretrainedConfig())
    except Exception as exc:  # noqa: BLE001 -- one line naming the directory, whatever broke
        message = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{where}: the tokenizer files in {directory} cannot be loaded "
                          f"({type(exc).__name__}: {message})") from exc


def check_vocabulary(guide_tokenizer, guide_vocab_size: int, model, directory) -> None:
    """Refuse a guide whose token ids mean other tokens than the diffusion model's, in one line with
    the first difference. Only the diffusion model's own special tokens may be missing from the
    guide. Without a tokenizer on either side only the vocabulary sizes can be compared."""
    source = getattr(model, "source", None) or "the diffusion model"
    head = f"plugins.{NAME}.guide: {directory}: its tokenizer differs from {source}'s"
    ours = model.tokenizer
    if ours is None or guide_tokenizer is None:
        if ours is not None or guide_tokenizer is not None:
            lacking = directory if guide_tokenizer is None else source
            raise ConfigError(f"plugins.{NAME}.guide: {directory}: its vocabulary cannot be checked against "
                              f"{source}'s: {lacking} has no tokenizer files")
        if guide_vocab_size != model.config.vocab_size:
            raise ConfigError(f"plugins.{NAME}.guide: {directory}: vocab_size {guide_vocab_size} differs from "
                              f"{source}'s {model.config.vocab_size} (neither has a tokenizer to compare)")
        return
    mine, theirs = ours.get_vocab(), guide_tokenizer.get_vocab()
    special = set(ours.all_special_tokens) | {t.content for t in ours.added_tokens_decoder.values() if t.special}
    for token, i in sorted(mine.items(), key=lambda item: item[1]):
        if token not in theirs:
            if token in special:
                continue
            raise ConfigError(f"{head}: {token!r} (id {i} there) is missing here")
        if theirs[token] != i:
            raise ConfigError(f"{head}: {token!r} is id {i} there, {theirs[token]} here")
    for token, i in sorted(theirs.items(), key=lambda item: item[1]):
        if token not in mine:
            raise ConfigError(f"{head}: {token!r} (id {i} here) is not in its vocabulary")


class GuidedDiffusion(Plugin):
    """Guided diffusion: a small autoregressive guide decides how many of the drafts to commit at once."""

    name = NAME
    Options = GuidedOptions
    provides = frozenset({"commit_policy"})
    exact_options: ClassVar[dict[str, Any] | None] = None  # a decoding policy: the others are checked under it

    def __init__(self, options=None):
        super().__init__(options)
        self._guide: Guide | None = None
        self._loaded_for = None
        self._cache = None

    @classmethod
    def contract_options(cls, model, directory) -> dict[str, Any]:
        """A tiny random Llama guide of the contract model's vocabulary (no tokenizer, as the model)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = model.config
        config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=None, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        torch.manual_seed(0)
        with torch.inference_mode(False), _quiet_progress():
            LlamaForCausalLM(config).save_pretrained(directory)
        return {"guide": str(directory)}

    # ---- generation lifecycle -------------------------------------------------------------------
    @hookimpl
    def dare_generation_start(self, state):
        key = (id(state.model), state.model.device, self.options.dtype or state.model.dtype)
        if self._loaded_for != key:
            self._guide = load_guide(self.options, state.model)
            self._loaded_for = key
        self._cache = self._guide.new_cache()
        zero = torch.zeros((), dtype=torch.long, device=state.x.device)
        self._counts = dict.fromkeys(("drafted", "verified", "accepted", "fallbacks", "threshold_commits",
                                      "eos_filled", "decisions"), zero)
        self.forwards = self.rows = self.flops = 0

    @hookimpl
    def dare_block_min_forwards(self, state):
        # with the early stop a block after the answer has nothing to decode: no bound, the loop asks
        return 0 if self.options.stop_at_eos else 1

    @hookimpl
    def dare_select_commits(self, state, proposal):
        masked = proposal.candidates
        width = masked.shape[-1]
        index = torch.arange(width, device=masked.device)
        first = torch.where(masked, index, width).amin(-1)
        start = int(first.min())  # one host read: the window starts at the batch's first masked column
        if start == width:
            return torch.zeros_like(masked)
        agree = self._verify(state, proposal, start)
        agree[:, :start] = True  # committed in every row
        run = torch.cumprod((agree | ~masked).long(), dim=-1).bool()
        accepted = run & masked
        has = masked.any(-1)
        none = has & ~accepted.any(-1)
        commit = accepted | (self._fallback(proposal, first, index) & none[:, None])
        if self.options.also_commit_above is not None:
            extra = masked & (proposal.probability >= self.options.also_commit_above) & ~commit
            self._add("threshold_commits", extra.sum())
            commit = commit | extra
        self._add("drafted", masked.sum())
        self._add("accepted", accepted.sum())
        self._add("fallbacks", none.sum())
        self._add("decisions", has.sum())
        return commit

    def _fallback(self, proposal, first, index):
        if self.options.fallback == "first":
            return index == first[:, None]
        confidence = proposal.confidence
        best = confidence.argmax(-1, keepdim=True)
        return torch.zeros_like(proposal.candidates).scatter_(-1, best, True)

    def _verify(self, state, proposal, start: int) -> torch.Tensor:
        """Bool (B, c): where the guide agrees with the draft, over the windows it checked (False
        beyond them). Chained windows of `verify_window` columns from `start` (block-relative)."""
        cols, window = proposal.columns, self.options.verify_window
        masked = proposal.candidates
        agree = torch.zeros_like(masked)
        alive = masked.any(-1)
        while True:
            stop = min(cols.stop - cols.start, start + window)
            logits = self._guide_logits(state, proposal, cols.start + start, cols.start + stop)
            ok = self._accepts(logits, proposal.tokens[:, start:stop])
            agree[:, start:stop] = ok
            self._add("verified", masked[:, start:stop].sum())
            alive = alive & (ok | ~masked[:, start:stop]).all(-1)
            if stop == cols.stop - cols.start or not bool(alive.any()):  # a host read per window
                return agree
            start = stop

    def _guide_logits(self, state, proposal, start: int, stop: int) -> torch.Tensor:
        """Guide logits predicting canvas columns [start, stop): a forward over the columns from the
        cache's end to stop - 1, the block's masked columns holding their drafts."""
        past = self._cache.get_seq_length()
        block = proposal.columns
        tokens = state.x[:, past:stop - 1].clone()
        lo = max(past, block.start)
        if lo < stop - 1:
            tokens[:, lo - past:] = proposal.tokens[:, lo - block.start:stop - 1 - block.start]
        keep = stop - start
        logits = self._guide.forward(tokens, state.attention_mask[:, :stop - 1].long(),
                                     state.positions[:, past:stop - 1], self._cache, keep)
        fed = stop - 1 - past
        flops = self._guide.flops(state.batch, past, fed, keep)
        self.forwards += 1
        self.rows += fed * state.batch
        self.flops += flops
        state.stats.add_extra_flops("guide", flops)
        return logits

    def _accepts(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Bool (B, w): the guide's rule on each draft, in float32; ties agree; a draft id beyond
        the guide's logits never agrees."""
        logits = logits.float()
        inside = drafts < logits.shape[-1]
        ids = drafts.clamp(max=logits.shape[-1] - 1)[..., None]
        rule = self.options.accept
        if rule == "argmax":
            ok = logits.gather(-1, ids).squeeze(-1) >= logits.amax(-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            p = probs.gather(-1, ids).squeeze(-1)
            if rule == "min_prob":
                ok = p >= self.options.min_prob
            else:
                top = probs.topk(min(self.options.top_k, probs.shape[-1]), dim=-1).values
                ok = (p >= top[..., -1]) & (p >= self.options.relative * top[..., 0])
        return ok & inside

    @hookimpl
    def dare_step_end(self, state, committed):
        if self.options.stop_at_eos:
            self._add("eos_filled", state.fill_after_stop().sum())
        # keep the cache of the columns committed in every row, less the last (it is fed again: its
        # output predicts the first masked column)
        answer = state.masked[:, state.prompt_end:]
        index = torch.arange(answer.shape[1], device=answer.device)
        first = int(torch.where(answer, index, answer.shape[1]).amin())  # host read
        keep = state.prompt_end + first - 1
        drop = self._cache.get_seq_length() - keep
        if drop > 0:  # crop(0) would empty the cache in transformers 4
            self._cache.crop(-drop)

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._counts[key] = self._counts[key] + value

    @hookimpl
    def dare_generation_end(self, state):
        self._cache = None

    @hookimpl
    def dare_generation_abort(self, state, error):
        self._cache = None

    @hookimpl
    def dare_report_stats(self, state):
        counts = {k: int(v) for k, v in self._counts.items()}
        decisions = counts.pop("decisions")
        return {"guide": self._guide.source, "guide_execution": "eager", "guide_forwards": self.forwards,
                "guide_rows": self.rows, "guide_flops": self.flops, **counts,
                "accepted_per_forward_mean": counts["accepted"] / decisions if decisions else 0.0,
                "fallback_rate": counts["fallbacks"] / decisions if decisions else 0.0}
