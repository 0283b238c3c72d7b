"""The executor: runs the model's step forward eagerly, compiled, or compiled and replayed from CUDA graphs.

One executor per (model, execution config) and process (`executor_for`), so compilation is paid
once per process and input shape, not once per generation: a second Pipeline over the same model
reuses the compiled code. What each generation paid is in its stats (`execution.compile_time_s`).

Shapes are static: the fed columns reach the compiled forward as an index tensor, never as
Python ints, so a dual cache's block forward is one graph for every block, the full-canvas
refresh another, and a prefix cache's suffix one per distinct suffix length (after the second
length torch.compile makes that dimension dynamic and stops recompiling). In cuda_graphs mode
the activation store is allocated once per (batch, canvas length) and kept, because a replayed
graph writes into fixed addresses.
"""

from __future__ import annotations

import time
import types
import warnings
import weakref

import torch

from ..config.execution import ExecutionConfig
from . import regions as compile_regions

# compiled graphs a model may keep: full canvas, block, suffix lengths, with and without padding
_RECOMPILE_LIMIT = 64


class Executor:
    def __init__(self, model, config: ExecutionConfig):
        self.config = config
        self.mode = config.resolved_mode(model.device.type)
        if self.mode == "cuda_graphs" and model.device.type != "cuda":
            raise ValueError(f"execution.mode = 'cuda_graphs' needs a CUDA device; the model is on "
                             f"{model.device}; allowed here: eager, compiled, auto")
        if self.mode == "cuda_graphs" and config.backend != "inductor":
            raise ValueError(f"execution.mode = 'cuda_graphs' with backend = {config.backend!r}: CUDA graphs "
                             f"come from inductor; use backend: inductor, or mode: compiled")
        self._compiled: dict[tuple[str, bool], object] = {}  # (forward, regions) -> its torch.compile wrapper
        self._stores: dict[tuple[int, int], object] = {}
        self.compile_time_s = 0.0  # of the current generation
        self.compiles = 0
        self.eager_forwards = 0  # forwards of the current generation that could not run compiled
        self.eager_reason: str | None = None
        # compile repeated layer code once; switched off for good if a compile with regions fails
        self.regions = config.regions and compile_regions.AVAILABLE
        self.regions_error: str | None = None

    # ---- per generation -----------------------------------------------------------------------
    def begin_generation(self) -> None:
        self.compile_time_s, self.compiles, self.eager_forwards, self.eager_reason = 0.0, 0, 0, None

    def report(self) -> dict:
        return {"mode": self.mode, "backend": None if self.mode == "eager" else self.config.backend,
                "compile_time_s": round(self.compile_time_s, 6), "compiles": self.compiles,
                "eager_forwards": self.eager_forwards, "eager_reason": self.eager_reason,
                "regions": self.mode != "eager" and self.regions, "regions_error": self.regions_error}

    def ran_eager(self, reason: str) -> None:
        """Note a forward the caller had to run eagerly (e.g. a reuse object that cannot be captured)."""
        if self.mode != "eager":
            self.eager_forwards += 1
            self.eager_reason = reason

    def holds_store(self, batch: int, length: int) -> bool:
        """Whether a store of this shape is already allocated (kept in cuda_graphs mode)."""
        return (batch, length) in self._stores

    def new_store(self, model, batch: int, length: int):
        """The activation store of a generation. Graph replays write into fixed addresses, so in
        cuda_graphs mode one store per shape is kept, cleared, and its tensors marked static."""
        if self.mode != "cuda_graphs":
            return model.new_store(batch, length)
        store = self._stores.get((batch, length))
        if store is None:
            store = self._stores[(batch, length)] = model.new_store(batch, length)
            store.on_new_tensor = torch._dynamo.mark_static_address
            for t in store.tensors():
                torch._dynamo.mark_static_address(t)
        else:
            store.clear()
        return store

    # ---- the step forward ---------------------------------------------------------------------
    def forward_fed(self, model, tokens, fed: slice, positions, key_mask, store, head_rows):
        """`model.forward_fed` for the fed columns `fed`, in this executor's mode."""
        if self.mode == "eager":
            return model.forward_fed(tokens, fed, positions, key_mask, store, head_rows)
        cols = torch.arange(fed.start, fed.stop, device=tokens.device)
        return self._call("forward_fed", tokens.device, model, tokens, cols, positions, key_mask, store, head_rows)

    def captures(self, reuse) -> bool:
        """Whether forwards with these reuse objects run compiled; notes the reason when they cannot."""
        if self.mode == "eager":
            return False
        if not reuse.capturable:
            self.ran_eager(f"layer reuse ({reuse.describe()}) is not capturable: its rows are selected with "
                           f"data-dependent shapes")
            return False
        return True

    def forward_reused(self, model, tokens, fed: slice, positions, key_mask, store, reuse, head_rows, refresh):
        """`model.forward_reused` (capturable reuse objects) for the fed columns `fed`, compiled."""
        cols = torch.arange(fed.start, fed.stop, device=tokens.device)
        return self._call("forward_reused", tokens.device, model, tokens, cols, positions, key_mask, store, reuse,
                          head_rows, refresh)

    def _call(self, forward: str, device, *args):
        if self.mode == "cuda_graphs":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        # a call that compiled (dynamo's graph counter moved) is timed after the fact: a clock read
        # around every call would cost a device synchronisation per step
        graphs = _compiled_graphs()
        started = time.perf_counter()
        out = self._run(forward, args)
        if _compiled_graphs() != graphs:
            self.compile_time_s += _clock(device) - started
            self.compiles += _compiled_graphs() - graphs
        return out

    def _run(self, forward: str, args):
        if self.regions:
            try:
                with compile_regions.regions(True):
                    return self._compiled_forward(args[0], forward)(*args)
            except torch._dynamo.exc.TorchDynamoException as error:
                # regions are young in torch: compile every layer inline instead, for this executor's lifetime
                self.regions, self.regions_error = False, f"{type(error).__name__}: {str(error).splitlines()[0]}"
                warnings.warn(f"compiling with regions failed ({self.regions_error}); compiling every layer "
                              f"inline instead (slower to compile, same results)", RuntimeWarning, stacklevel=4)
        with compile_regions.regions(False):
            return self._compiled_forward(args[0], forward)(*args)

    def _compiled_forward(self, model, forward: str):
        """The torch.compile wrapper of the model's `forward` ("forward_fed" | "forward_reused") for the
        current regions setting. With regions, shapes stay static: a new shape costs one region-sized
        compile, and regions cannot yet be stamped out under dynamic shapes. Inline, the second shape
        of a dimension makes it dynamic, so that a prefix cache's many suffix lengths share a graph."""
        key = (forward, self.regions)
        if key not in self._compiled:
            _raise_recompile_limit()
            options = {"fullgraph": self.config.fullgraph, "backend": self.config.backend,
                       "dynamic": False if self.regions else None}
            if self.mode == "cuda_graphs":
                options["mode"] = "reduce-overhead"
            # unbound (the model is an argument): the executor, kept per model in a weak mapping, must
            # not hold the model alive
            self._compiled[key] = torch.compile(_own_code(getattr(type(model), forward)), **options)
        return self._compiled[key]


def _own_code(function):
    """A copy of `function` with its own code object. Dynamo keeps compiled graphs per code object
    and stops compiling one after `recompile_limit` graphs; with a copy per executor that limit
    counts this model's shapes only, not every model a long-lived process has compiled."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def _compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7; both exist in between
        if hasattr(config, name) and getattr(config, name) < _RECOMPILE_LIMIT:
            setattr(config, name, _RECOMPILE_LIMIT)


_EXECUTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def executor_for(model, config: ExecutionConfig) -> Executor:
    """The process-wide executor of `model` under `config` (created on first request)."""
    per_model = _EXECUTORS.setdefault(model, {})
    if config not in per_model:
        per_model[config] = Executor(model, config)
    return per_model[config]
