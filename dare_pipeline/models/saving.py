"""Write a DiffusionTransformer as an HF-format checkpoint directory that `load_model` reads back.

The directory gets the family's own config.json (LLaDA or Dream field names), `model.safetensors`
with the family's checkpoint tensor names (the inverse of the loader's name table) and, when a
tokenizer is given or attached to the model, the tokenizer files. Everything is written into a
temporary sibling directory first and renamed into place, so a reader never sees a half-written
checkpoint and an interrupted save leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .families import family_named
from .loader import resolve_dtype

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def llada_config_json(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    raw = {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "mlp_hidden_size": cfg.ffn_hidden,
        "mlp_ratio": max(1, cfg.ffn_hidden // cfg.d_model),
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.embedding_size,
        "rope_theta": cfg.rope_theta,
        "max_sequence_length": cfg.max_sequence_length,
        "rms_norm_eps": cfg.rms_norm_eps,
        "weight_tying": cfg.tie_word_embeddings,
        "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "block_type": "llama",
        "rope": True,
        "rope_full_precision": True,
        "alibi": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "activation_type": "silu",
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "use_cache": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if cfg.extra_stop_ids:
        raw["eot_token_ids"] = list(cfg.extra_stop_ids)
    return raw


def dream_config_json(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    if not cfg.qkv_bias:
        raise ValueError("a Dream checkpoint always has q/k/v biases (Qwen2 layout); this model has qkv_bias=False")
    if cfg.embedding_size != cfg.vocab_size:
        raise ValueError(f"a Dream checkpoint has embedding_size == vocab_size; got {cfg.embedding_size} "
                         f"!= {cfg.vocab_size}")
    return {
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.ffn_hidden,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_sequence_length,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "attention_dropout": 0.0,
        "use_cache": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }


_CONFIG_WRITERS = {"llada": llada_config_json, "dream": dream_config_json}


def checkpoint_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's parameters under the family's checkpoint names, on CPU in `dtype`."""
    cfg = model.config
    names = family_named(cfg.family).names(cfg)  # checkpoint name -> our name
    state = model.state_dict()
    missing = [ours for ours in names.values() if ours not in state]
    if missing:
        raise ValueError(f"model has no parameters {missing[:5]} required by the {cfg.family} layout")
    return {theirs: state[ours].detach().to(device="cpu", dtype=dtype).contiguous().clone()
            for theirs, ours in names.items()}


def _write_tokenizer(tokenizer, directory: Path) -> None:
    from .tokenizer import VOCAB, save_tokenizer

    if tokenizer is True or tokenizer == "default":
        save_tokenizer(directory)
        return
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    if vocab == VOCAB:  # the embedded character tokenizer: its own writer keeps the files portable
        save_tokenizer(directory)
    else:
        tokenizer.save_pretrained(str(directory))


def save_checkpoint(model, directory: str | os.PathLike, tokenizer=None, dtype: str | torch.dtype | None = None,
                    generation: dict | None = None) -> Path:
    """Write `model` (a DiffusionTransformer) as an HF-format checkpoint into `directory`.

    tokenizer: a tokenizer object (saved next to the weights), True / "default" for the embedded
    character tokenizer, or None to use the model's attached `.tokenizer` (if any).
    dtype: storage dtype of the weights (default: the model's dtype).
    generation: generation_config.json keys to write (max_new_tokens, steps, block_length: the
    defaults a recipe takes from the model), over those of the model's own `.generation_config`.
    The write is atomic: a temporary sibling directory is filled, then renamed over `directory`.
    """
    cfg: ModelConfig = model.config
    if cfg.family not in _CONFIG_WRITERS:
        raise ValueError(f"cannot save family {cfg.family!r}; known: {sorted(_CONFIG_WRITERS)}")
    dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"storage dtype {dtype} is not supported; supported: {list(_DTYPE_NAMES.values())}")
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config = _CONFIG_WRITERS[cfg.family](cfg, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = {**(getattr(model, "generation_config", None) or {}), **(generation or {}),
                      "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                      "bos_token_id": cfg.bos_token_id, "mask_token_id": cfg.mask_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        save_file(checkpoint_tensors(model, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
    return directory


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """A temporary sibling of `directory` to fill; when the block ends without an error its files are
    made readable by all and it is renamed over `directory`, else it is removed (a previous
    `directory` stays as it was)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():  # mkdtemp and safetensors create owner-only files; a checkpoint is shareable
            os.chmod(f, 0o644)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException:
        if old is not None and not directory.exists():  # the new one did not take its place: the old one back
            os.replace(old, directory)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
