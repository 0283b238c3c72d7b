"""Checks of a checkpoint directory's files, each failure naming the file and what is wrong: files
that are regular files inside the directory, JSON files that must hold an object, special token ids
the embedding can hold, weight tensors of a floating-point dtype with finite values, and a tokenizer
no larger than the embedding."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

import torch

from .config_reader import shown


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


# elements per isfinite() call: bounds the temporary mask (16 MiB) whatever the tensor's size
_FINITE_CHUNK = 1 << 24
SPECIAL_IDS = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


# JSON files of a checkpoint (config.json, the shard index, tokenizer files) are small
MAX_JSON_BYTES = 64 << 20


def checkpoint_file(directory: Path, name: str, listed_in: Path | None = None) -> Path:
    """`directory / name` once it is known to be a regular file of the checkpoint, else a CheckpointError.

    `name` is a relative path that stays inside the directory (no absolute path, no `..`). Symbolic
    links are followed, and their target must be a regular file inside the directory or, when the
    directory is a Hugging Face cache snapshot (`<repo>/snapshots/<revision>`), in that repository's
    `blobs/`, where the cache keeps the files its snapshots link to. A FIFO, a device or a directory
    is refused without being opened (opening a FIFO blocks until something writes to it)."""
    where = f"{listed_in}: names {name!r}" if listed_in is not None else f"{directory / name}"
    check_relative_name(name, where)
    path = directory / name
    root = directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append((root.parent.parent / "blobs").resolve())
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: not found" if listed_in is None else f"{where}, which is not found") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise CheckpointError(f"{where}: cannot be resolved ({exc})") from None
    if not any(target.is_relative_to(a) for a in allowed):
        inside = " or the cache's blobs/" if len(allowed) > 1 else ""
        raise CheckpointError(f"{where}: leads to {target}, outside the checkpoint directory {root}; only files "
                              f"inside it{inside} are read")
    mode = os.stat(target).st_mode
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: is {kind_of(mode)}, not a regular file; a checkpoint's files must be regular "
                              f"files")
    return path


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is: "a directory", "a FIFO (named pipe)", "a device", ..."""
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a regular file" if stat.S_ISREG(mode) else "not a regular file")


def check_relative_name(name: str, where: str) -> None:
    """A file name that stays inside the checkpoint directory: relative, without `..`."""
    if not name or os.path.isabs(name) or "\\" in name or ".." in PurePosixPath(name).parts or "\0" in name:
        raise CheckpointError(f"{where}: a checkpoint's files are named relative to its directory, without '..' "
                              f"or an absolute path")


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` (UTF-8), or a CheckpointError saying why there is none."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes; a checkpoint's JSON files may have at most {MAX_JSON_BYTES}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; nesting past the stack
        raise CheckpointError(f"{path}: cannot be read as JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_special_ids(cfg, path: Path, embedding_key: str = "embedding_size") -> None:
    """Each special token id that is set is an integer the embedding has a row for (its size comes
    from config.json's `embedding_key`)."""
    for name in SPECIAL_IDS:
        value = getattr(cfg, name)
        if value is None and name != "mask_token_id":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{path}: {name} = {shown(value)}: expected an integer token id")
        if not 0 <= value < cfg.embedding_size:
            raise CheckpointError(f"{path}: {name} = {shown(value)}: out of range; allowed 0 to "
                                  f"{cfg.embedding_size - 1} (the embedding has {embedding_key} = "
                                  f"{cfg.embedding_size} rows)")
    for value in cfg.extra_stop_ids:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < cfg.embedding_size:
            raise CheckpointError(f"{path}: eot_token_ids = {shown(list(cfg.extra_stop_ids))}: expected end-of-turn "
                                  f"token ids, integers from 0 to {cfg.embedding_size - 1}")


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
    """Every id the tokenizer can produce needs an embedding row, and the tokenizer's mask token (when
    it names one) must be the model's: the decoder fills that id, and prompts may not contain it."""
    size = len(tokenizer)
    if size > cfg.embedding_size:
        raise CheckpointError(f"{directory}: the tokenizer has {size} tokens but the embedding has "
                              f"{cfg.embedding_size} rows (config.json); tokenizer and weights do not belong together")
    mask = getattr(tokenizer, "mask_token", None)
    if mask is not None and tokenizer.convert_tokens_to_ids(mask) != cfg.mask_token_id:
        raise CheckpointError(f"{directory}: the tokenizer's mask token {mask!r} is id "
                              f"{tokenizer.convert_tokens_to_ids(mask)}, config.json's mask_token_id is "
                              f"{cfg.mask_token_id}; tokenizer and weights do not belong together")
