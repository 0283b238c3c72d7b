"""The activation store: per layer and per absolute canvas column, what a forward computed.

Every cache and reuse plugin reads and writes here instead of keeping private copies. Keys and
values are kept after RoPE in SDPA layout (B, kv_heads, L, head_dim), so the store itself is the
key/value tensor attention reads; other fields are (B, L, dim) rows created on first use.
Writes are positional (absolute columns) and may be masked per batch element, which is what keeps
batched decoding identical to decoding each prompt alone.
"""

from __future__ import annotations

import torch

# Fields the core itself writes when a plugin has asked for them (see `track`).
ATTN_OUT = "attn_out"  # attention block's residual delta: o_proj(attention(...))
FFN_OUT = "ffn_out"  # feed-forward block's residual delta


class ActivationStore:
    def __init__(self, n_layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.n_layers, self.batch, self.length = n_layers, batch, length
        self.device, self.dtype = device, dtype
        shape = (batch, kv_heads, length, head_dim)
        self._k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self._v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        # which (batch, column) entries of K/V hold a computed value, per layer
        self._kv_written = [torch.zeros(batch, length, dtype=torch.bool, device=device) for _ in range(n_layers)]
        self._fields: dict[str, list[torch.Tensor | None]] = {}
        self._written: dict[str, list[torch.Tensor]] = {}
        self._tracked: set[str] = set()
        self._buffers: dict[str, torch.Tensor] = {}
        # called with every tensor created later (fields on first use): the cuda_graphs executor marks
        # them as static addresses
        self.on_new_tensor = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the store holds (keys, values, written flags, fields)."""
        fields = [t for rows in self._fields.values() for t in rows if t is not None]
        written = [t for rows in self._written.values() for t in rows]
        return self._k + self._v + self._kv_written + fields + written + list(self._buffers.values())

    def clear(self) -> None:
        """Forget every value (a new generation) while keeping the tensors, and so their addresses."""
        for t in self.tensors():
            t.zero_()
        self._tracked.clear()

    # ---- keys and values -------------------------------------------------------------------
    def keys(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def values(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def kv_written(self, layer: int) -> torch.Tensor:
        return self._kv_written[layer]

    def write_kv(self, layer: int, columns: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> None:
        """Store K/V rows (B, heads, n, hd) at absolute `columns`; `mask` (B, n) keeps old rows where False."""
        if mask is not None:
            m = mask[:, None, :, None]
            k = torch.where(m, k, self._k[layer][:, :, columns])
            v = torch.where(m, v, self._v[layer][:, :, columns])
        self._k[layer][:, :, columns] = k
        self._v[layer][:, :, columns] = v
        written = self._kv_written[layer]
        written[:, columns] = True if mask is None else (written[:, columns] | mask)

    def write_v(self, layer: int, columns: torch.Tensor | slice, v: torch.Tensor,
                mask: torch.Tensor | None = None, check: bool = True) -> None:
        """Replace value rows (B, heads, n, hd) at absolute `columns`, keys untouched (dLLM-Cache's
        V-verify refreshes every value it computed); only rows that already hold K/V may be replaced
        (`check`: verified on the host, which a compiled forward cannot do)."""
        if mask is not None:
            v = torch.where(mask[:, None, :, None], v, self._v[layer][:, :, columns])
        if check:
            missing = ~self._kv_written[layer][:, columns]
            if mask is not None:
                missing &= mask
            if bool(missing.any()):
                raise ValueError(f"write_v at layer {layer}: some rows hold no keys/values yet (use write_kv)")
        self._v[layer][:, :, columns] = v

    # ---- row fields (attention output, FFN output, plugin fields) ---------------------------
    def track(self, name: str) -> None:
        """Ask the core to write `name` (ATTN_OUT or FFN_OUT) at every forward from now on."""
        self._tracked.add(name)

    def tracks(self, name: str) -> bool:
        return name in self._tracked

    def field(self, name: str, layer: int, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (B, L, dim) tensor of `name` at `layer`, created (zeros, unwritten) on first use."""
        rows = self._fields.setdefault(name, [None] * self.n_layers)
        if rows[layer] is None:
            rows[layer] = torch.zeros(self.batch, self.length, dim, device=self.device, dtype=dtype or self.dtype)
            new = [rows[layer]]
            if name not in self._written:
                self._written[name] = [torch.zeros(self.batch, self.length, dtype=torch.bool, device=self.device)
                                       for _ in range(self.n_layers)]
                new += self._written[name]
            if self.on_new_tensor is not None:
                for t in new:
                    self.on_new_tensor(t)
        return rows[layer]

    def written(self, name: str, layer: int) -> torch.Tensor:
        """(B, L) bool: entries of `name` at `layer` that hold a computed value."""
        if name not in self._written:
            return torch.zeros(self.batch, self.length, dtype=torch.bool, device=self.device)
        return self._written[name][layer]

    def write(self, name: str, layer: int, columns: torch.Tensor | slice, rows: torch.Tensor,
              mask: torch.Tensor | None = None) -> None:
        """Store rows (B, n, dim) at absolute `columns`; `mask` (B, n) keeps old rows where False."""
        target = self.field(name, layer, rows.shape[-1], rows.dtype)
        if mask is not None:
            rows = torch.where(mask[..., None], rows, target[:, columns])
        target[:, columns] = rows
        written = self._written[name][layer]
        written[:, columns] = True if mask is None else (written[:, columns] | mask)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A named tensor of any shape (e.g. a plugin's device-side counters), zeros on first use and
        after `clear`: kept with the store so that a replayed graph finds it at the same address."""
        t = self._buffers.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            t = self._buffers[name] = torch.zeros(shape, dtype=dtype, device=self.device)
            if self.on_new_tensor is not None:
                self.on_new_tensor(t)
        return t

    def read(self, name: str, layer: int, columns: torch.Tensor | slice) -> torch.Tensor:
        rows = self._fields.get(name)
        if rows is None or rows[layer] is None:
            raise KeyError(f"activation store has no field {name!r} at layer {layer}")
        return rows[layer][:, columns]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
