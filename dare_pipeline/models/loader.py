"""Load a local HF-format checkpoint directory into a DiffusionTransformer.

The model is built on the meta device and its parameters are assigned straight from the
safetensors files (one tensor at a time, already in the target dtype), so an 8B checkpoint
never needs twice its memory. Every problem is reported with the file and tensor it concerns.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch
from safetensors import SafetensorError, safe_open

from .checkpoint_checks import (
    CheckpointError,
    check_special_ids,
    check_tokenizer_size,
    check_weight,
    check_relative_name,
    checkpoint_file,
    kind_of,
    read_json_object,
)
from .families import family_for
from .memory import available_bytes, gib, parameter_count, weights_bytes
from .transformer import DiffusionTransformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# end-of-turn tokens of instruct tokenizers; generation stops at them like at EOS
_EOT_TOKENS = ("<|eot_id|>", "<|eot|>")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_config(directory: Path):
    """The family and ModelConfig described by directory/config.json."""
    path = directory / "config.json"
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: config.json not found (a checkpoint directory needs config.json and *.safetensors)")
    raw = read_json_object(checkpoint_file(directory, "config.json"))
    try:
        family = family_for(raw.get("model_type"), str(path))
        cfg = family.parse_config(raw)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc.args[0] if exc.args else exc}") from exc
    check_special_ids(cfg, path, family.keys.get("embedding_size", "vocab_size"))
    return family, cfg


def read_generation_config(directory: Path) -> dict:
    """directory/generation_config.json as a dict ({} without one): Hugging Face's generation
    settings, of which a recipe takes max_new_tokens, steps and block_length (config/generation.py)."""
    path = directory / "generation_config.json"
    if not path.exists() and not path.is_symlink():
        return {}
    return read_json_object(checkpoint_file(directory, path.name))


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        weight_map = read_json_object(checkpoint_file(directory, index.name)).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> shard file name")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            check_relative_name(name, f"{index}: names {name!r}")
        missing = [str(directory / n) for n in names if not (directory / n).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed but not found: {missing}")
        return [checkpoint_file(directory, name, listed_in=index) for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weight files found")
    return [checkpoint_file(directory, f.name) for f in files]


# files a tokenizer may read; each one present must be a regular file of the checkpoint
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "chat_template.*")


# Tokenizer classes whose code a checkpoint ships (tokenizer_config.json's auto_map) and the
# transformers tokenizer that reads the same files the same way: a checkpoint's own code never runs.
# Dream's DreamTokenizer is Qwen2's byte-level BPE (vocab.json + merges.txt, the Qwen2 split pattern).
BUILT_IN_FOR_CUSTOM = {"DreamTokenizer": "qwen2"}


def _shipped_tokenizer_class(directory: Path) -> str | None:
    """tokenizer_config.json's tokenizer class when it is code shipped with the checkpoint (auto_map
    names it and transformers has no class of that name), else None."""
    if not (directory / "tokenizer_config.json").is_file():
        return None
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = read_json_object(checkpoint_file(directory, "tokenizer_config.json"))
    auto_map = config.get("auto_map")
    remote = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if not remote:
        return None
    named = config.get("tokenizer_class")
    if isinstance(named, str) and tokenizer_class_from_name(named) is not None:
        return None  # a class of transformers' own, which it reads without the shipped code
    if isinstance(named, str) and named:
        return named
    return next((str(c).rsplit(".", 1)[-1] for c in (remote if isinstance(remote, list) else [remote]) if c), "?")


def _load_tokenizer(directory: Path):
    for pattern in _TOKENIZER_FILES:
        for file in sorted(directory.glob(pattern)):
            checkpoint_file(directory, file.name)
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

    shipped = _shipped_tokenizer_class(directory)
    built_in = None if shipped is None else BUILT_IN_FOR_CUSTOM.get(shipped.removesuffix("Fast"))
    try:
        if shipped is None:
            # An empty config keeps AutoTokenizer from reading config.json, whose model_type (llada,
            # Dream) transformers does not know and would warn about; the tokenizer class comes from
            # tokenizer_config.json either way.
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, config=PretrainedConfig(),
                                                 trust_remote_code=False)
        if built_in is not None:
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, tokenizer_type=built_in,
                                                 trust_remote_code=False)
        if (directory / "tokenizer.json").is_file():  # it describes the whole tokenizer: no code needed
            return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers and tokenizers raise many types for one broken file
        files = sorted(f.name for f in directory.iterdir() if f.name.startswith(("tokenizer", "special_tokens")))
        raise CheckpointError(f"{directory}: the tokenizer files {files} cannot be loaded "
                              f"({type(exc).__name__}: {str(exc).strip()[:300]})") from exc
    raise CheckpointError(f"{directory / 'tokenizer_config.json'}: tokenizer_class = {shipped!r} is code shipped with "
                          f"the checkpoint (auto_map), which dare-pipeline does not run; it reads "
                          f"{sorted(BUILT_IN_FOR_CUSTOM)} with transformers' own tokenizers, and any other with a "
                          f"tokenizer.json")


def _end_of_answer_ids(tokenizer, generation_config: dict, cfg, directory: Path) -> tuple[int, ...]:
    """Token ids besides config.json's eos_token_id that end an answer: the tokenizer's end-of-turn
    tokens and its own eos token (an instruct tokenizer's, e.g. `<|im_end|>`, which the references
    cut answers at), and generation_config.json's eos_token_id (an id or a list of them)."""
    ids = []
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in _EOT_TOKENS if t in vocab]
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.append(tokenizer.eos_token_id)
    theirs = generation_config.get("eos_token_id")
    for i in theirs if isinstance(theirs, list) else [] if theirs is None else [theirs]:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.embedding_size:
            raise CheckpointError(f"{directory / 'generation_config.json'}: eos_token_id = {theirs!r}: expected a "
                                  f"token id (or a list of them) below the embedding size {cfg.embedding_size}")
        ids.append(i)
    return tuple(ids)


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load the checkpoint at `path` ("default" = the embedded model) for inference.

    Returns a DiffusionTransformer in eval mode with `.tokenizer` (None when the directory has no
    tokenizer files; prompts are then token ids), `.source` (the directory) and `.generation_config`
    (its generation_config.json, {} without one) attached.
    """
    from .default import resolve_model_path

    directory = resolve_model_path(path)
    if not directory.is_dir():
        if not directory.exists():
            raise CheckpointError(f"{directory}: checkpoint directory not found")
        raise CheckpointError(f"{directory}: is {kind_of(directory.stat().st_mode)}, not a directory; a checkpoint "
                              f"is a directory of config.json and *.safetensors files")
    torch_dtype, device = resolve_dtype(dtype), torch.device(device)
    family, cfg = read_config(directory)
    sizes = f"config.json: {family.describe(cfg)}"
    _check_weights_fit(cfg, torch_dtype, device, directory / "config.json", sizes)
    generation_config = read_generation_config(directory)
    tokenizer = _load_tokenizer(directory)
    if tokenizer is not None:
        check_tokenizer_size(tokenizer, cfg, directory)
    extra = _end_of_answer_ids(tokenizer, generation_config, cfg, directory)
    cfg = attrs.evolve(cfg, extra_stop_ids=tuple(i for i in dict.fromkeys(cfg.extra_stop_ids + extra)
                                                 if i != cfg.eos_token_id))

    with torch.device("meta"):
        model = DiffusionTransformer(cfg)
    expected = model.state_dict()
    names = family.names(cfg)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    found_in: dict[str, Path] = {}
    for file in _weight_files(directory):
        try:
            _read_weights(file, names, expected, state, unexpected, found_in, device, torch_dtype, sizes)
        except (SafetensorError, OSError, RuntimeError) as exc:  # empty, truncated or not safetensors at all
            raise CheckpointError(f"{file}: not a readable safetensors file ({str(exc).strip()[:200]})") from exc
    missing = sorted(k for k, ours in names.items() if ours not in state)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        raise CheckpointError(f"{directory}: " + "; ".join(parts) + f" ({sizes})")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.eval().requires_grad_(False)
    model.tokenizer = tokenizer
    model.source = directory
    model.generation_config = generation_config
    return model


def _check_weights_fit(cfg, dtype: torch.dtype, device: torch.device, config_path: Path, sizes: str) -> None:
    """Refuse weights the device cannot hold, from config.json's sizes, before anything is built."""
    needed, available = weights_bytes(cfg, dtype), available_bytes(device)
    if available is not None and needed > available:
        raise CheckpointError(
            f"{config_path}: the weights need about {gib(needed)} in {str(dtype).removeprefix('torch.')} "
            f"({parameter_count(cfg):,} parameters from {sizes.removeprefix('config.json: ')}) but {device} has "
            f"{gib(available)} available")


def _read_weights(file: Path, names, expected, state, unexpected, found_in, device, dtype, sizes: str) -> None:
    """Move `file`'s tensors into `state` (our names), checking shape, dtype, finiteness and that no
    tensor comes from two files."""
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 -- safe_open handles are not iterable
            ours = names.get(key)
            if ours is None:
                unexpected.append(f"{key} (in {file.name})")
                continue
            if key in found_in:
                raise CheckpointError(f"{file}: tensor {key} is also in {found_in[key]}; each tensor belongs in "
                                      f"one file")
            found_in[key] = file
            want, shape = tuple(expected[ours].shape), tuple(f.get_slice(key).get_shape())
            if shape != want:  # from the header, before the tensor is read
                raise CheckpointError(f"{file}: tensor {key} has shape {shape}, expected {want} ({sizes})")
            tensor = f.get_tensor(key)
            if not tensor.is_floating_point():
                check_weight(tensor, key, file)
            state[ours] = tensor.to(device=device, dtype=dtype)
            check_weight(state[ours], key, file)  # in the target dtype: an overflow to inf counts

