"""What a model and a generation need in memory, estimated from sizes before anything is allocated,
and what the device has available.

A checkpoint's weights are counted from config.json; a generation's needs from its batch and canvas:
the activation store (keys and values of every layer for every column, plus the row fields reuse
plugins track), the logits of a block and what sampling makes of them, and the activations of one
layer at a time. These are estimates of the tensors the code allocates (within tens of percent), not
of allocator overheads; they exist to refuse what can never fit with a message saying why, before
the machine starts swapping or the process is killed.

Available memory: on CUDA, `torch.cuda.mem_get_info`'s free bytes; on the CPU, MemAvailable from
/proc/meminfo (pages the kernel can hand out without swapping), lowered to the cgroup's limit minus
its usage where one is set (containers), else `os.sysconf`'s available physical pages. Where none
can be read (MPS, other systems) nothing is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

GiB = 1 << 30


def available_bytes(device) -> int | None:
    """Bytes the device can still allocate, or None where that cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):  # no CUDA in this build or process: the load says so itself
            return None
        # blocks torch's caching allocator holds but no tensor uses are free to it
        return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _cpu_available()
    return None


def _cpu_available() -> int | None:
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_headroom()
    return found if limit is None else min(found, limit)


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), None without a limit."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        group = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((group / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parameter_count(cfg) -> int:
    """Parameters of the transformer `cfg` (a ModelConfig) describes."""
    d, kv = cfg.d_model, cfg.n_kv_heads * (cfg.d_model // cfg.n_heads)
    per_layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * cfg.ffn_hidden + ((d + 2 * kv) if cfg.qkv_bias else 0)
    head = 0 if cfg.tie_word_embeddings else cfg.embedding_size * d
    return cfg.embedding_size * d + head + d + cfg.n_layers * per_layer


def weights_bytes(cfg, dtype: torch.dtype) -> int:
    return parameter_count(cfg) * itemsize(dtype)


def generation_bytes(cfg, dtype: torch.dtype, *, batch: int, model_batch: int, length: int, block_length: int,
                     store: bool, fields: int, temperature: float, filtered: bool = False) -> dict[str, int]:
    """Estimated bytes of one generation, by part: `model_batch` rows (batch, doubled by guidance) of
    `length` columns; `store`: an activation store is kept, with `fields` row fields per layer;
    `filtered`: top_p / top_k apply (core/sampling.py `filters_apply`)."""
    size, hd = itemsize(dtype), cfg.d_model // cfg.n_heads
    kv = cfg.n_kv_heads * hd
    rows = model_batch * length
    parts = {}
    if store:
        parts["activation store"] = cfg.n_layers * rows * (2 * kv * size + 1 + fields * (cfg.d_model * size + 1))
    confidence = 8 if cfg.family == "llada" else 4  # sampling.CONFIDENCE_DTYPE
    block_rows = block_length * cfg.embedding_size
    parts["logits"] = (model_batch * block_rows * (size + 4)
                       + batch * block_rows * (2 * confidence + (24 if temperature > 0 else 0)
                                               # the filters: float32 tempered, sorted and cumulated
                                               # logits, int64 order, bool masks; the filtered copy
                                               + ((32 + size) if filtered else 0)))
    # one layer at a time: residual, norm, q, repeated k/v, attention out, projections; rope in float32
    parts["layer activations"] = rows * ((6 * cfg.d_model + 3 * cfg.ffn_hidden) * size + (cfg.d_model + kv + hd) * 8)
    return parts


def gib(n: int) -> str:
    if n < GiB:
        return f"{n / (1 << 20):.1f} MiB"
    if n < 1 << 80:
        return f"{n / GiB:.1f} GiB"
    return f"2^{n.bit_length() - 31} GiB or more"  # beyond a float's reach, and any machine's
