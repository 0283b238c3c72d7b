"""Layer-level reuse: objects a plugin hands over once per generation, called by the model directly.

Per layer and per forward the model asks three questions, each answered by at most one object:

  layer_rows(call, x)  which fed rows run this layer at all; the others add their cached attention
                       and FFN deltas to the (fresh) residual stream          (dLLM-Cache)
  kv_rows(call, q)     which running rows recompute K and V; the others keep the cached rows (DARE-KV)
  attn_rows(call, q)   which running rows recompute their attention row and output projection; the
                       others add the cached attention delta                   (DARE-O)
  ffn_rows(call, x)    which running rows run the feed-forward block on x, their residual rows after
                       attention; the others add the cached FFN delta          (ffn_reuse)

Each answer is a bool mask (B, rows) or None for "all". Asking per layer through pluggy would cost
microseconds per call on a hot path; these are plain method calls.

Capture (compiled and cuda_graphs execution): a reuse object that sets `capturable = True` runs
inside the compiled step forward. It then may not read tensor values on the host, and its per-forward
decisions that depend on Python state (the step, a refresh) are taken in `begin_forward`, on the
host, before the forward. Row selection cannot have a data-dependent size there, so the model
computes a fixed number of rows per decision: `capacity(decision, layer, rows)` on the host, and
the object's mask must never ask for more rows than that (counted over the batch: a row any batch
element needs is computed for all). Objects that are not capturable run their forwards eagerly.
"""

from __future__ import annotations

import attrs
import torch

from .store import ActivationStore

DECISIONS = ("layer_rows", "kv_rows", "attn_rows", "ffn_rows")


@attrs.define(slots=True)
class LayerCall:
    """What a reuse object sees at one layer of one forward."""

    layer: int
    module: torch.nn.Module  # the TransformerLayer: its norms and projections are public
    store: ActivationStore
    fed: slice | None  # absolute canvas columns fed to this forward (None under capture: see `cols`)
    tokens: torch.Tensor  # (B, n) token ids of the fed rows
    refresh: bool  # a full cache refresh: the row feeder's, or a block's first forward without one
    step: int  # decoding step (0-based, counted over the whole generation)
    # attention's padding mask over keys (B, L), None when nothing is padded
    key_mask: torch.Tensor | None = None
    # RoPE cos/sin of the fed rows, (B, 1, n, head_dim) each
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # absolute columns of the rows that run this layer (set by the model after layer_rows)
    active: torch.Tensor | None = None
    # (B, m) bool over `active`: which of them each batch element really runs (None = all)
    run: torch.Tensor | None = None
    # attn_norm of the running rows' input (B, m, d), set with `active`
    h: torch.Tensor | None = None
    # the fed columns as an index tensor (n,) (under capture the only form: no Python ints)
    cols: torch.Tensor | None = None
    # fed-relative indices of `active` (None when every fed row runs)
    active_rows: torch.Tensor | None = None
    # inside a compiled forward: no host reads, selections of `capacity` rows
    capture: bool = False


class LayerReuse:
    """Base class: override the decisions you own and list them in `decisions`."""

    decisions: frozenset[str] = frozenset()
    # store fields (store.ATTN_OUT, store.FFN_OUT) the core must keep written for this object
    fields: frozenset[str] = frozenset()
    # may run inside a compiled forward (see the module docstring)
    capturable: bool = False

    def begin_forward(self, refresh: bool, step: int) -> None:
        """On the host, before each forward: `refresh` as LayerCall.refresh, `step` the 0-based forward."""

    def capacity(self, decision: str, layer: int, rows: int) -> int:
        """Under capture: how many of the `rows` running rows `decision` recomputes at `layer` (all by
        default; fewer is what saves work in a compiled forward)."""
        return rows

    def value_rows(self, layer: int, batch: int) -> int:
        """Value projections this object computes itself at `layer` in the current forward (e.g.
        dLLM-Cache's V-verify), so the stats count them (sub-operation `v`); known on the host."""
        return 0

    def values_fresh(self, layer: int) -> bool:
        """Whether, at `layer` in the current forward, this object has already written every running
        row's value into the store (from this forward's input): the model then projects keys only."""
        return False

    def layer_rows(self, call: LayerCall, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def kv_rows(self, call: LayerCall, q: torch.Tensor) -> torch.Tensor | None:
        return None

    def attn_rows(self, call: LayerCall, q: torch.Tensor) -> torch.Tensor | None:
        return None

    def ffn_rows(self, call: LayerCall, x: torch.Tensor) -> torch.Tensor | None:
        return None


class ReuseSet:
    """The reuse objects of one generation, with each decision routed to its single owner."""

    def __init__(self, objects: list[LayerReuse]):
        self.objects = list(objects)
        owners: dict[str, LayerReuse] = {}
        for obj in self.objects:
            unknown = set(obj.decisions) - set(DECISIONS)
            if unknown:
                raise ValueError(f"{type(obj).__name__} claims unknown decisions {sorted(unknown)}; known: {DECISIONS}")
            for decision in obj.decisions:
                if decision in owners:
                    raise ValueError(f"both {type(owners[decision]).__name__} and {type(obj).__name__} "
                                     f"decide {decision!r}; only one may")
                owners[decision] = obj
        self._owner = owners
        self.fields = frozenset().union(*(obj.fields for obj in self.objects)) if self.objects else frozenset()

    def __bool__(self) -> bool:
        return bool(self.objects)

    def describe(self) -> str:
        return ", ".join(type(obj).__name__ for obj in self.objects)

    @property
    def capturable(self) -> bool:
        return all(obj.capturable for obj in self.objects)

    def begin_forward(self, refresh: bool, step: int) -> None:
        for obj in self.objects:
            obj.begin_forward(refresh, step)

    def capacity(self, decision: str, layer: int, rows: int) -> int:
        owner = self._owner.get(decision)
        return rows if owner is None else min(rows, owner.capacity(decision, layer, rows))

    def value_rows(self, layer: int, batch: int) -> int:
        return sum(obj.value_rows(layer, batch) for obj in self.objects)

    def values_fresh(self, layer: int) -> bool:
        return any(obj.values_fresh(layer) for obj in self.objects)

    def layer_rows(self, call, x):
        owner = self._owner.get("layer_rows")
        return None if owner is None else owner.layer_rows(call, x)

    def kv_rows(self, call, q):
        owner = self._owner.get("kv_rows")
        return None if owner is None else owner.kv_rows(call, q)

    def attn_rows(self, call, q):
        owner = self._owner.get("attn_rows")
        return None if owner is None else owner.attn_rows(call, q)

    def ffn_rows(self, call, x):
        owner = self._owner.get("ffn_rows")
        return None if owner is None else owner.ffn_rows(call, x)
