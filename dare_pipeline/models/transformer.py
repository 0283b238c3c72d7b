"""The bidirectional transformer behind LLaDA and Dream, written so rows can be computed selectively.

Two entry points:
- `forward(input_ids, attention_mask)`: every row, every layer; returns raw logits (B, L, V).
  For Dream these are NOT shifted: row i is the model output at position i, which predicts token
  i+1 (the decoding loop applies the shift through `prediction_rows`).
- `forward_rows(...)`: the decoding loop's call. Only the fed columns enter the model; attention
  reads keys/values from the activation store (full canvas length) after the fed rows' fresh K/V
  are written into it; reuse objects may skip work per layer and per row (see core/layer_reuse.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layer_reuse import LayerCall, ReuseSet
from ..core.store import ATTN_OUT, FFN_OUT, ActivationStore
from ..execution.regions import compile_region
from .config import ModelConfig
from .rope import apply_rope, rope_cos_sin

# Columns of the per-layer row counters (see core/stats.py).
COUNT_Q, COUNT_KV, COUNT_ATTN, COUNT_FFN = range(4)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics whatever the model dtype, cast back before the gain (as both references)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class TransformerLayer(nn.Module):
    """Pre-norm attention + SwiGLU block; each sub-operation is a public method reuse code can call."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(d, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(d, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, d, bias=False)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)

    @compile_region
    def project_q(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated queries (B, heads, n, hd) from normed rows h (B, n, d)."""
        return apply_rope(self._heads(self.q_proj(h), self.n_heads), cos, sin)

    @compile_region
    def project_v(self, h: torch.Tensor) -> torch.Tensor:
        """Values (B, kv_heads, n, hd): no rotation, so they can be compared across steps directly."""
        return self._heads(self.v_proj(h), self.n_kv_heads)

    @compile_region
    def project_k(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated keys (B, kv_heads, n, hd)."""
        return apply_rope(self._heads(self.k_proj(h), self.n_kv_heads), cos, sin)

    def project_kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (B, kv_heads, n, hd)."""
        return self.project_k(h, cos, sin), self.project_v(h)

    @compile_region
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention rows for queries q over keys k/v, through the output projection: (B, n, d)."""
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # head j reads kv head j // rep (the references' repeat_kv layout)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward block's residual delta for residual rows x."""
        return self.swiglu(self.ffn_norm(x))

    @compile_region  # the norm stays outside: its float eps cannot be a region operand
    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def forward(self, x, cos, sin, key_mask):
        h = self.attn_norm(x)
        q = self.project_q(h, cos, sin)
        k, v = self.project_kv(h, cos, sin)
        x = x + self.attend(q, k, v, key_mask)
        return x + self.ffn(x)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for left-padded rows: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DiffusionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def _rope(self, positions):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x))[..., : self.config.vocab_size]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (B, L, vocab) of every row; attention_mask (B, L), 1 = real token, 0 = padding."""
        key_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            key_mask = None if bool(attention_mask.all()) else attention_mask
        if position_ids is None:
            position_ids = (positions_from_mask(attention_mask) if attention_mask is not None
                            else torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids))
        cos, sin = self._rope(position_ids)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask)
        return self._head(x)

    def new_store(self, batch: int, length: int) -> ActivationStore:
        c = self.config
        return ActivationStore(c.n_layers, batch, length, c.n_kv_heads, c.head_dim, self.device, self.dtype)

    @torch.no_grad()
    def forward_rows(self, tokens: torch.Tensor, fed: slice, positions: torch.Tensor, key_mask: torch.Tensor | None,
                     store: ActivationStore | None, reuse: ReuseSet, head_rows: torch.Tensor | None = None,
                     counters: torch.Tensor | None = None, refresh: bool = False, step: int = 0,
                     executor=None) -> torch.Tensor:
        """Logits (B, r, V) for the fed canvas columns `fed`.

        tokens: (B, n) token ids of the fed columns; positions, key_mask: (B, L) over the whole canvas.
        store: None only when every column is fed and no reuse object is active (plain forward).
        head_rows: fed-relative row indices whose logits are wanted (None = all fed rows).
        counters: a `stats.RowCounter`, given the rows computed per layer and sub-operation.
        executor: the `execution.Executor` that runs the forward (eager, compiled or graph-replayed);
        None runs it eagerly here.
        """
        if reuse:
            reuse.begin_forward(refresh, step)
            if executor is not None and executor.captures(reuse):
                logits = executor.forward_reused(self, tokens, fed, positions, key_mask, store, reuse, head_rows,
                                                 refresh)
                if counters is not None:
                    _count_captured(counters, reuse, len(self.layers), tokens.shape[0], fed.stop - fed.start)
                return logits
            return self._forward_with_reuse(tokens, fed, positions, key_mask, store, reuse, head_rows, counters,
                                            refresh, step)
        if executor is None:
            logits = self.forward_fed(tokens, fed, positions, key_mask, store, head_rows)
        else:
            logits = executor.forward_fed(self, tokens, fed, positions, key_mask, store, head_rows)
        if counters is not None:  # every fed row runs every sub-operation: counted on the host, no sync
            rows = tokens.shape[0] * (fed.stop - fed.start)
            for i in range(len(self.layers)):
                counters.add(i, (rows,) * 4)
        return logits

    def forward_fed(self, tokens: torch.Tensor, cols: torch.Tensor | slice, positions: torch.Tensor,
                    key_mask: torch.Tensor | None, store: ActivationStore | None,
                    head_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The step forward without reuse: every fed row runs every layer. Static shapes and no host
        synchronisation: with `cols` an index tensor (n,) of the fed columns, its graph depends only on
        n, so one compiled graph serves every block of a dual cache. Eager callers pass a slice (views
        instead of gathers). Without a store every column is fed and attention reads the fresh K/V."""
        cos, sin = self._rope(positions[:, cols])
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, key_mask) if store is None else self._layer_fed(layer, i, x, cols, cos, sin,
                                                                                    key_mask, store)
        if head_rows is not None:
            x = x[:, head_rows]
        return self._head(x)

    @staticmethod
    def _layer_fed(layer, i, x, cols, cos, sin, key_mask, store: ActivationStore):
        """One layer over the fed rows: their fresh K/V go into the store, attention reads all of it."""
        h = layer.attn_norm(x)
        q = layer.project_q(h, cos, sin)
        k, v = layer.project_kv(h, cos, sin)
        store.write_kv(i, cols, k, v)
        delta = layer.attend(q, store.keys(i), store.values(i), key_mask)
        if store.tracks(ATTN_OUT):
            store.write(ATTN_OUT, i, cols, delta)
        x = x + delta
        f = layer.ffn(x)
        if store.tracks(FFN_OUT):
            store.write(FFN_OUT, i, cols, f)
        return x + f

    def _forward_with_reuse(self, tokens, fed, positions, key_mask, store, reuse, head_rows, counters, refresh, step):
        """forward_rows with reuse objects, eagerly: per layer they choose which rows run (see core/layer_reuse.py),
        and the chosen rows are picked with data-dependent shapes."""
        cols = torch.arange(fed.start, fed.stop, device=tokens.device)
        return self._reuse_layers(tokens, fed, positions, key_mask, store, reuse, head_rows, counters,
                                  fed=fed, cols=cols, refresh=refresh, step=step)

    def forward_reused(self, tokens: torch.Tensor, cols: torch.Tensor, positions: torch.Tensor,
                       key_mask: torch.Tensor | None, store: ActivationStore, reuse: ReuseSet,
                       head_rows: torch.Tensor | None = None, refresh: bool = False) -> torch.Tensor:
        """The step forward with capturable reuse objects, for the compiled executor: the fed columns
        are an index tensor, every selection has the size `reuse.capacity` gives, nothing is read on
        the host (the rows are counted by the caller, from the same capacities)."""
        return self._reuse_layers(tokens, cols, positions, key_mask, store, reuse, head_rows, None,
                                  fed=None, cols=cols, refresh=refresh, step=-1, capture=True)

    def _reuse_layers(self, tokens, where, positions, key_mask, store, reuse, head_rows, counters, **call_fields):
        """Every layer through `_layer_rows`; `where` indexes the fed columns of `positions` (a slice
        eagerly, the index tensor under capture), `call_fields` complete each layer's LayerCall."""
        cos, sin = self._rope(positions[:, where])
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            call = LayerCall(layer=i, module=layer, store=store, tokens=tokens, key_mask=key_mask, rope=(cos, sin),
                             **call_fields)
            x = self._layer_rows(layer, call, x, cos, sin, key_mask, reuse, counters)
        if head_rows is not None:
            x = x[:, head_rows]
        return self._head(x)

    def _layer_rows(self, layer, call, x, cos, sin, key_mask, reuse: ReuseSet, counters):
        """One layer over the fed rows with the store as key/value source; see module docstring."""
        i, store = call.layer, call.store
        batch, n = x.shape[0], x.shape[1]
        # where the fed rows live in the store: a slice (cheap views) eagerly, the index tensor under capture
        fed_where = call.cols if call.capture else call.fed

        # 1. which rows run this layer (the rest add cached deltas at the end)
        run = reuse.layer_rows(call, x)
        if run is None:
            idx, xa, cols, run_sub, cos_a, sin_a = None, x, call.cols, None, cos, sin
        else:
            idx = _select(run, call, reuse, "layer_rows", n)
            xa, cols, run_sub = x[:, idx], call.cols[idx], run[:, idx]
            cos_a, sin_a = cos[:, :, idx], sin[:, :, idx]
        # store location of the running rows: a slice (a cheap view) unless rows were picked
        where = fed_where if idx is None else cols
        active = xa.shape[1]
        h = layer.attn_norm(xa)
        call.active, call.active_rows, call.run, call.h = cols, idx, run_sub, h
        q = layer.project_q(h, cos_a, sin_a)

        # 2. keys and values: recompute the chosen rows, write them into the store, attend over it
        kv = reuse.kv_rows(call, q)
        fresh_values = reuse.values_fresh(i)  # a reuse object already wrote every running row's value
        if kv is None:
            _check_full(call, reuse, "kv_rows", active)
            if fresh_values:
                k, v = layer.project_k(h, cos_a, sin_a), store.values(i)[:, :, where]
            else:
                k, v = layer.project_kv(h, cos_a, sin_a)
            store.write_kv(i, where, k, v, run_sub)
            kv_count = active
        else:
            if run_sub is not None:
                kv = kv & run_sub
            sel = _select(kv, call, reuse, "kv_rows", active)
            k, v = layer.project_kv(h[:, sel], cos_a[:, :, sel], sin_a[:, :, sel])
            store.write_kv(i, cols[sel], k, v, kv[:, sel])
            kv_count = sel.shape[0]

        # 3. attention rows: recompute the chosen rows, take the cached delta for the rest
        attn = reuse.attn_rows(call, q)
        if attn is None:
            _check_full(call, reuse, "attn_rows", active)
            delta = layer.attend(q, store.keys(i), store.values(i), key_mask)
            attn_count = active
        else:
            delta, attn_count = _chosen_or_cached(
                attn, run_sub, call, reuse, "attn_rows", ATTN_OUT, where, xa.shape[-1],
                lambda sel: layer.attend(q[:, :, sel], store.keys(i), store.values(i), key_mask))
        if store.tracks(ATTN_OUT):
            store.write(ATTN_OUT, i, where, delta, run_sub)
        xa = xa + delta

        # 4. feed-forward: recompute the chosen rows, take the cached delta for the rest
        ffn = reuse.ffn_rows(call, xa)
        if ffn is None:
            _check_full(call, reuse, "ffn_rows", active)
            f = layer.ffn(xa)
            ffn_count = active
        else:
            f, ffn_count = _chosen_or_cached(ffn, run_sub, call, reuse, "ffn_rows", FFN_OUT, where, xa.shape[-1],
                                             lambda sel: layer.ffn(xa[:, sel]))
        if store.tracks(FFN_OUT):
            store.write(FFN_OUT, i, where, f, run_sub)
        xa = xa + f
        if counters is not None:  # what ran: a row any batch element needs is computed for all of them
            counters.add(i, (batch * active, batch * kv_count, batch * attn_count, batch * ffn_count,
                             _value_only_rows(reuse, i, batch, active)))
        if idx is None:
            return xa
        out = x + store.read(ATTN_OUT, i, fed_where) + store.read(FFN_OUT, i, fed_where)
        out[:, idx] = torch.where(run_sub[..., None], xa, out[:, idx])
        return out


def _chosen_or_cached(chosen, run_sub, call: LayerCall, reuse: ReuseSet, decision: str, field: str, where, width: int,
                      compute) -> tuple[torch.Tensor, int]:
    """A sub-operation's residual delta over the running rows: `compute(sel)` for the rows the reuse
    object chose (`sel`: their indices), the cached delta of `field` for the rest; and how many rows
    ran. A field no forward has written yet reads as zeros (objects reuse only written rows)."""
    if run_sub is not None:
        chosen = chosen & run_sub
    sel = _select(chosen, call, reuse, decision, chosen.shape[1])
    delta = call.store.field(field, call.layer, width)[:, where].clone()
    delta[:, sel] = torch.where(chosen[:, sel, None], compute(sel), delta[:, sel])
    return delta, sel.shape[0]


def _select(mask: torch.Tensor, call: LayerCall, reuse: ReuseSet, decision: str, rows: int) -> torch.Tensor:
    """Indices of the rows that at least one batch element needs (computed once for the whole batch):
    eagerly exactly those (a data-dependent size), under capture `reuse.capacity` of them, needed
    rows first and the rest by column (the object never asks for more than the capacity)."""
    if not call.capture:
        return mask.any(0).nonzero().squeeze(1)
    capacity = reuse.capacity(decision, call.layer, rows)
    order = torch.arange(rows, 0, -1, device=mask.device)  # earlier columns first among equals
    key = mask.any(0).long() * (rows + 1) + order
    return torch.topk(key, capacity).indices.sort().values


def _check_full(call: LayerCall, reuse: ReuseSet, decision: str, rows: int) -> None:
    # under capture the caller counts `capacity` rows: an object that answers "all" must say so there too
    if call.capture and reuse.capacity(decision, call.layer, rows) != rows:
        raise RuntimeError(f"{decision} at layer {call.layer}: the reuse object answered 'every row' but its "
                           f"capacity is {reuse.capacity(decision, call.layer, rows)} of {rows}")


def _count_captured(counters, reuse: ReuseSet, n_layers: int, batch: int, rows: int) -> None:
    """Rows a captured forward computed, from the capacities it was built with (no device read)."""
    for i in range(n_layers):
        active = reuse.capacity("layer_rows", i, rows)
        counters.add(i, (batch * active, batch * reuse.capacity("kv_rows", i, active),
                         batch * reuse.capacity("attn_rows", i, active), batch * reuse.capacity("ffn_rows", i, active),
                         _value_only_rows(reuse, i, batch, active)))


def _value_only_rows(reuse: ReuseSet, layer: int, batch: int, active: int) -> int:
    """Values projected outside the K/V path (`v`). Where the running rows took their values from
    those (values_fresh), only their keys were projected: counted as `kv` rows, so the value half of
    them is taken off `v` (kv + v then counts every projection once)."""
    rows = reuse.value_rows(layer, batch)
    return rows - batch * active if reuse.values_fresh(layer) else rows

