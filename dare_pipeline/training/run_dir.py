"""A training run's output directory, as both trainers (trainer.py, guide.py) write it: the
resumable checkpoint, replaced atomically, and the JSONL log, cut back to the checkpoint's step
when a run resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def truncate_log(path: Path, step: int) -> None:
    """Drop the log lines past `step` (written after the checkpoint, before an interruption)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
