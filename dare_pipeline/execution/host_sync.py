"""Counting host synchronisations: every place the host waits for a tensor's value.

On a GPU each of these stalls the host until the device has caught up, so a decoding step that has
them cannot be enqueued ahead of the device (and cannot be captured in a CUDA graph). On the CPU
nothing stalls, but the same calls happen, so counting them here proves a step is free of them
before it ever runs on a GPU (`torch.cuda.set_sync_debug_mode` is the GPU-side check).

Counted: a scalar read (`.item()`, `bool()`, `int()`, `float()`: aten `_local_scalar_dense`), an
operator whose output size depends on the data (`nonzero`, `masked_select`, `unique`, indexing with
a bool mask, `repeat_interleave` with tensor repeats), and a device-to-host read (`.tolist()`,
`.cpu()`, `.numpy()`, which on a CPU tensor reach no operator at all and are counted at the method).

Inference mode hides operators on inference tensors from dispatch modes, so while counting,
`torch.inference_mode` is replaced by `torch.no_grad` (the same operators, visible): code that
enters inference mode inside the block (Pipeline.generate does) is counted whole.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# operators that read a value on the host or give an output whose shape depends on the data
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
    _aten.repeat_interleave.self_Tensor: "repeat_interleave",
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
              _aten._index_put_impl_.default}
# tensor methods that read data to the host without an operator on a CPU tensor
_HOST_READS = ("tolist", "cpu", "numpy")


class HostSyncCounter(TorchDispatchMode):
    """Counts host synchronisations by kind (`counts`) while active; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _SYNC_OPS.get(func)
        if kind is None and func in _INDEX_OPS and _has_bool_index(args):
            kind = "bool_mask_index"
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


@contextlib.contextmanager
def count_host_syncs():
    """`with count_host_syncs() as counter: ...` then `counter.total`, `counter.counts`."""
    counter = HostSyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def wrap(name, original):
        def method(self, *args, **kwargs):
            counter.counts[name] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    inference_mode = torch.inference_mode
    torch.inference_mode = torch.no_grad
    try:
        with counter:
            yield counter
    finally:
        torch.inference_mode = inference_mode
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
