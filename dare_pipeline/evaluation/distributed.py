"""Data parallelism over prompts: the process group that `torchrun` / `accelerate launch` set up the
environment for, and the few collectives the `dare` lm-eval model and the ablation runner need.

A launcher starts W processes and sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init()` joins them in a torch.distributed process group (gloo on CPU, NCCL on CUDA, where each
process takes the GPU `cuda:LOCAL_RANK`). lm-eval's evaluator then gives each rank every W-th
problem and gathers the per-problem scores on rank 0 (see `DareLM.rank` / `world_size`).

Failures are made collective: `agree(error)` is called by every rank at the same point, and when
one rank failed, every rank raises, so no rank is left waiting in a collective that the failed
rank never reaches.

Nothing here imports lm-eval.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch

# ranks wait in collectives for the slowest one (a long share of prompts, rank 0 writing results):
# lm-eval's HF model uses the same long timeout
TIMEOUT = timedelta(weeks=52)
SHUTDOWN_TIMEOUT = timedelta(seconds=60)


class RankFailed(RuntimeError):
    """Another rank of a data-parallel group failed at a point where every rank had to agree."""


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 when not launched by one)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def is_active() -> bool:
    """A process group with more than one process is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_active() else 1


def device_for_rank(device: str) -> str:
    """A CUDA device becomes this process's GPU, `cuda:LOCAL_RANK`; any other device is kept."""
    device = str(device)
    return f"cuda:{local_rank()}" if device.startswith("cuda") else device


def init(device: str = "cpu") -> tuple[int, int]:
    """Join the launcher's process group (once per process): gloo for a CPU device, NCCL for CUDA.
    Returns (rank, world size); (0, 1) when not launched with WORLD_SIZE > 1."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched_world_size() <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(_shutdown)
    return dist.get_rank(), dist.get_world_size()


def _shutdown() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        # leave together: a rank that tears its group down while a peer still talks to it can abort
        # in gloo's threads ("terminate called without an active exception"); a peer that is gone
        # fails the barrier at once, one that hangs within a minute
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=SHUTDOWN_TIMEOUT)
            else:
                dist.barrier()
        except Exception:  # noqa: BLE001, S110 - exiting anyway; the barrier only orders the teardown
            pass
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a group)."""
    if not is_active():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list | None:
    """The objects of every rank on `dst`, None on the others."""
    if not is_active():
        return [obj]
    out = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == dst else None
    torch.distributed.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src`, on every rank."""
    if not is_active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated along dim 0 (a 0-d tensor counts as one element), like
    accelerate's `gather`."""
    if not is_active():
        return tensor
    t = tensor.reshape(1) if tensor.dim() == 0 else tensor
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def barrier() -> None:
    if is_active():
        torch.distributed.barrier()


def agree(error: BaseException | None, what: str = "") -> None:
    """Called by every rank at the same point: raises on every rank when any rank failed (the
    failed rank re-raises its own error, the others raise RankFailed naming it)."""
    if not is_active():
        if error is not None:
            raise error
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = all_gather_object(message)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise RankFailed(f"data-parallel rank {r} failed{' in ' + what if what else ''}: {m}")


def together(fn, what: str = ""):
    """fn() on every rank, then `agree`: when any rank's fn raised, every rank raises (so none goes
    on to a collective the failed one never reaches). Without a group, just fn()."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001  (re-raised by agree, on every rank)
        error = exc
    agree(error, what)
    return result
