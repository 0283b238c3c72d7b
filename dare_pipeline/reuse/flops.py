"""FLOPs estimated from the rows each sub-operation computed (`GenerationStats.layer_rows`).

Per computed row of one layer (d = d_model, d_kv = n_kv_heads * head_dim, f = ffn_hidden,
L = keys attended over = the canvas length, padding included; a multiply-add counts 2):

    q     2 * d * d                      query projection
    kv    2 * 2 * d * d_kv               key and value projections
    attn  4 * L * d + 2 * d * d          scores (2 L d) and weighted values (2 L d) over all heads,
                                         then the output projection
    ffn   6 * d * f                      SwiGLU: gate, up and down projections
    v     2 * d * d_kv                   a value projection alone (dLLM-Cache's V-verify)

plus, per LM-head row (the rows whose logits are read: the current block's columns, per forward
and per model batch row), `2 * d * V` with V the LM head's output rows (`embedding_size`).
Norms, RoPE, softmax and sampling are left out (O(d) per row). The numbers are estimates of the
matrix work actually done: rows a reuse plugin kept out of a sub-operation cost nothing here.
Other models a plugin runs (guided diffusion's guide) count their own FLOPs into
`GenerationStats.extra_flops`; `with_extra` adds them to an estimate's total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ROW_OPS = ("q", "kv", "attn", "ffn")  # what a plain forward computes for every row
SUB_OPS = (*ROW_OPS, "v")


def per_row(config, key_length: int) -> dict[str, int]:
    """FLOPs of one computed row of one layer for each sub-operation, and of one LM-head row."""
    d = config.d_model
    d_kv = config.n_kv_heads * (d // config.n_heads)
    return {
        "q": 2 * d * d,
        "kv": 2 * 2 * d * d_kv,
        "attn": 4 * key_length * d + 2 * d * d,
        "ffn": 6 * d * config.ffn_hidden,
        "v": 2 * d * d_kv,
        "lm_head": 2 * d * config.embedding_size,
    }


def _totals(layer_rows) -> dict[str, int]:
    """Rows per sub-operation summed over layers, from a (n_layers, 5) tensor, a list of
    [q, kv, attn, ffn, v] rows (4 in results written before `v` was counted), a list of
    {sub_op: rows} dicts, or an already summed mapping."""
    if isinstance(layer_rows, Mapping):
        return {op: int(layer_rows.get(op, 0)) for op in SUB_OPS}
    if hasattr(layer_rows, "tolist"):
        layer_rows = layer_rows.tolist()
    out = dict.fromkeys(SUB_OPS, 0)
    for row in layer_rows:
        values = [row.get(op, 0) for op in SUB_OPS] if isinstance(row, Mapping) else row
        for op, v in zip(SUB_OPS, values):
            out[op] += int(v)
    return out


def estimate(config, layer_rows, key_length: int, head_rows: int = 0) -> dict[str, int]:
    """FLOPs per sub-operation (summed over layers), the LM head, and `total`.

    layer_rows: rows computed per layer and sub-operation (see `_totals` for the accepted shapes);
    key_length: keys each attention row reads (the canvas length); head_rows: LM-head rows."""
    rows = _totals(layer_rows)
    cost = per_row(config, key_length)
    out = {op: rows[op] * cost[op] for op in SUB_OPS}
    out["lm_head"] = int(head_rows) * cost["lm_head"]
    out["total"] = sum(out.values())
    return out


def with_extra(estimated: Mapping[str, int], extra: Mapping[str, int]) -> dict[str, int]:
    """An `estimate` of the diffusion model's FLOPs with the FLOPs of other models a generation ran
    (`GenerationStats.extra_flops`: a guide's forwards) added as their own keys and to `total`."""
    out = dict(estimated)
    for name, value in extra.items():
        out[name] = out.get(name, 0) + int(value)
        out["total"] = out.get("total", 0) + int(value)
    return out


def full_recompute(config, forwards: int, rows_per_forward: int, key_length: int, head_rows: int = 0) -> dict:
    """FLOPs of `forwards` plain forwards of `rows_per_forward` rows each (every row through every
    sub-operation of every layer): the reference a reuse fraction or FLOPs saving is measured against."""
    rows = forwards * rows_per_forward * config.n_layers
    return estimate(config, {op: rows for op in ROW_OPS}, key_length, head_rows)


def add(a: dict[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Sum two FLOPs dicts key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def format_flops(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}FLOP"
    return f"{value:.0f} FLOP"


__all__: Sequence[str] = ("ROW_OPS", "SUB_OPS", "add", "estimate", "format_flops", "full_recompute", "per_row",
                          "with_extra")
