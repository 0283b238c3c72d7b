"""Is a recipe's `device` one this machine's torch can run on? Checked when the recipe loads, so
`recipe check` and `generate` refuse it before a model is built, with what is allowed and why."""

from __future__ import annotations

import torch

ALLOWED = "cpu, cuda, cuda:N (N a GPU index), mps"


def device_problem(value) -> str | None:
    """Why torch cannot run on `value` here, or None when it can."""
    if not isinstance(value, str):
        return f"expected a device name ({ALLOWED})"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        return f"not a device torch knows; allowed: {ALLOWED}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            return f"this torch build ({torch.__version__}) has no CUDA support, so CUDA is not available; use cpu"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "CUDA is not available on this machine (no GPU visible to torch); use cpu"
        if device.index is not None and device.index >= count:
            return f"CUDA is available with {count} GPU(s): cuda:0 to cuda:{count - 1}"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "MPS is not available on this machine; use cpu"
    return f"device type {device.type!r} is not supported; allowed: {ALLOWED}"


def usable_device(instance, attribute, value) -> None:
    """attrs validator: a device torch can run on here."""
    problem = device_problem(value)
    if problem:
        raise ValueError(f"{attribute.name} = {value!r}: {problem}")
