"""Checks of a checkpoint directory's files, each failure naming the file and what is wrong: JSON
files that must hold an object, special token ids the embedding can hold, weight tensors of a
floating-point dtype with finite values, and a tokenizer no larger than the embedding."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


# elements per isfinite() call: bounds the temporary mask (16 MiB) whatever the tensor's size
_FINITE_CHUNK = 1 << 24
SPECIAL_IDS = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` (UTF-8), or a CheckpointError saying why there is none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_special_ids(cfg, path: Path) -> None:
    """Each special token id that is set is an integer the embedding has a row for."""
    for name in SPECIAL_IDS:
        value = getattr(cfg, name)
        if value is None and name != "mask_token_id":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{path}: {name} = {value!r}: expected an integer token id")
        if not 0 <= value < cfg.embedding_size:
            raise CheckpointError(f"{path}: {name} = {value}: out of range; allowed 0 to {cfg.embedding_size - 1} "
                                  f"(the embedding has {cfg.embedding_size} rows)")
    for value in cfg.extra_stop_ids:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < cfg.embedding_size:
            raise CheckpointError(f"{path}: end-of-turn token id {value!r}: expected an integer from 0 to "
                                  f"{cfg.embedding_size - 1}")


def check_weight(tensor: torch.Tensor, key: str, file: Path) -> None:
    """A weight must be floating point (an integer tensor would be cast silently) and finite."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{file}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                              f"expected a floating-point tensor")
    flat = tensor.reshape(-1)
    for chunk in flat.split(_FINITE_CHUNK):
        if not bool(torch.isfinite(chunk).all()):
            bad = int((~torch.isfinite(flat)).sum())
            raise CheckpointError(f"{file}: tensor {key} has {bad} non-finite values (NaN or infinity) of "
                                  f"{flat.numel()}; the weights are corrupt (or overflow the chosen dtype)")


def check_tokenizer_size(tokenizer, cfg, directory: Path) -> None:
    """Every id the tokenizer can produce needs an embedding row."""
    size = len(tokenizer)
    if size > cfg.embedding_size:
        raise CheckpointError(f"{directory}: the tokenizer has {size} tokens but the embedding has "
                              f"{cfg.embedding_size} rows (config.json); tokenizer and weights do not belong together")
