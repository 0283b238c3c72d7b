"""Load a local HF-format checkpoint directory into a DiffusionTransformer.

The model is built on the meta device and its parameters are assigned straight from the
safetensors files (one tensor at a time, already in the target dtype), so an 8B checkpoint
never needs twice its memory. Every problem is reported with the file and tensor it concerns.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch
from safetensors import safe_open

from .families import family_for
from .transformer import DiffusionTransformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# end-of-turn tokens of instruct tokenizers; generation stops at them like at EOS
_EOT_TOKENS = ("<|eot_id|>", "<|eot|>")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_config(directory: Path):
    """The family and ModelConfig described by directory/config.json."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found (a checkpoint directory needs config.json and *.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    family = family_for(raw.get("model_type"), str(path))
    try:
        return family, family.parse_config(raw)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc.args[0] if exc.args else exc}") from exc


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed but not found: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weight files found")
    return files


def _load_tokenizer(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer, PretrainedConfig

    # An empty config keeps AutoTokenizer from reading config.json, whose model_type (llada, Dream)
    # transformers does not know and would warn about; the tokenizer class comes from
    # tokenizer_config.json either way.
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, config=PretrainedConfig())


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load the checkpoint at `path` ("default" = the embedded model) for inference.

    Returns a DiffusionTransformer in eval mode with `.tokenizer` (None when the directory has no
    tokenizer files; prompts are then token ids) and `.source` (the directory) attached.
    """
    from ..default_model import resolve_model_path

    directory = resolve_model_path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    torch_dtype, device = resolve_dtype(dtype), torch.device(device)
    _, cfg = read_config(directory)
    tokenizer = _load_tokenizer(directory)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        extra = tuple(vocab[t] for t in _EOT_TOKENS if t in vocab and vocab[t] != cfg.eos_token_id)
        cfg = attrs.evolve(cfg, extra_stop_ids=tuple(dict.fromkeys(cfg.extra_stop_ids + extra)))

    with torch.device("meta"):
        model = DiffusionTransformer(cfg)
    expected = model.state_dict()
    names = _family_names(directory, cfg)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open handles are not iterable
                ours = names.get(key)
                if ours is None:
                    unexpected.append(f"{key} (in {file.name})")
                    continue
                tensor = f.get_tensor(key)
                want = tuple(expected[ours].shape)
                if tuple(tensor.shape) != want:
                    raise CheckpointError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, expected {want}")
                state[ours] = tensor.to(device=device, dtype=torch_dtype)
    missing = sorted(k for k, ours in names.items() if ours not in state)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        raise CheckpointError(f"{directory}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.eval().requires_grad_(False)
    model.tokenizer = tokenizer
    model.source = directory
    return model


def _family_names(directory: Path, cfg) -> dict[str, str]:
    family, _ = read_config(directory)
    return family.names(cfg)
