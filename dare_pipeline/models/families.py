"""Model families: how a checkpoint's config.json and tensor names map onto the shared transformer.

A family knows three things: its config fields, its state-dict names, and whether its logits are
shifted by one position. Adding a family (another LLaDA/Dream kin) means adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from .config import ModelConfig

# per-layer parameter names of the shared transformer, in the order of the tables below
_LAYER_PARAMS = ("attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                 "ffn_norm.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


@attrs.frozen
class Family:
    name: str
    model_types: tuple[str, ...]
    parse_config: Callable[[dict], ModelConfig]
    # checkpoint tensor name -> our parameter name
    names: Callable[[ModelConfig], dict[str, str]]


def _require(raw: dict, key: str, source: str):
    if key not in raw:
        raise KeyError(f"{source}: missing required key {key!r}")
    return raw[key]


# ---- LLaDA -------------------------------------------------------------------------------------
def _llada_config(raw: dict) -> ModelConfig:
    src = "config.json (model_type 'llada')"
    if raw.get("block_type", "llama") != "llama":
        raise ValueError(f"{src}: block_type {raw['block_type']!r} is not supported; supported: 'llama'")
    if raw.get("alibi", False) or not raw.get("rope", True):
        raise ValueError(f"{src}: only RoPE position encoding is supported (rope=true, alibi=false)")
    d = _require(raw, "d_model", src)
    n_heads = _require(raw, "n_heads", src)
    vocab = _require(raw, "vocab_size", src)
    extra = tuple(raw.get("eot_token_ids", ()) or ())
    return ModelConfig(
        family="llada", d_model=d, n_layers=_require(raw, "n_layers", src), n_heads=n_heads,
        n_kv_heads=raw.get("n_kv_heads") or n_heads,
        ffn_hidden=raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d,
        vocab_size=vocab, embedding_size=raw.get("embedding_size") or vocab,
        rope_theta=float(raw.get("rope_theta", 10000.0)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_sequence_length=raw.get("max_sequence_length", 4096),
        qkv_bias=bool(raw.get("include_bias", False) or raw.get("include_qkv_bias", False)),
        tie_word_embeddings=bool(raw.get("weight_tying", False)), logits_shift=False,
        mask_token_id=_require(raw, "mask_token_id", src), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"), bos_token_id=raw.get("bos_token_id"), extra_stop_ids=extra,
    )


def _llada_names(cfg: ModelConfig) -> dict[str, str]:
    ours = dict(zip(_LAYER_PARAMS, ("attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                                    "attn_out.weight", "ff_norm.weight", "ff_proj.weight", "up_proj.weight",
                                    "ff_out.weight")))
    names = {"model.transformer.wte.weight": "embed.weight", "model.transformer.ln_f.weight": "final_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["model.transformer.ff_out.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for our, theirs in ours.items():
            names[f"model.transformer.blocks.{i}.{theirs}"] = f"layers.{i}.{our}"
        if cfg.qkv_bias:
            for p in ("q_proj", "k_proj", "v_proj"):
                names[f"model.transformer.blocks.{i}.{p}.bias"] = f"layers.{i}.{p}.bias"
    return names


# ---- Dream (Qwen2 layout) ----------------------------------------------------------------------
def _dream_config(raw: dict) -> ModelConfig:
    src = "config.json (model_type 'Dream')"
    d = _require(raw, "hidden_size", src)
    n_heads = _require(raw, "num_attention_heads", src)
    vocab = _require(raw, "vocab_size", src)
    return ModelConfig(
        family="dream", d_model=d, n_layers=_require(raw, "num_hidden_layers", src), n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads, ffn_hidden=_require(raw, "intermediate_size", src),
        vocab_size=vocab, embedding_size=vocab, rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_sequence_length=raw.get("max_position_embeddings", 4096), qkv_bias=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), logits_shift=True,
        mask_token_id=_require(raw, "mask_token_id", src), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"), bos_token_id=raw.get("bos_token_id"),
    )


def _dream_names(cfg: ModelConfig) -> dict[str, str]:
    ours = dict(zip(_LAYER_PARAMS, ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                    "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                    "mlp.down_proj.weight")))
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for our, theirs in ours.items():
            names[f"model.layers.{i}.{theirs}"] = f"layers.{i}.{our}"
        for p in ("q_proj", "k_proj", "v_proj"):
            names[f"model.layers.{i}.self_attn.{p}.bias"] = f"layers.{i}.{p}.bias"
    return names


FAMILIES = (
    Family("llada", ("llada", "LLaDA"), _llada_config, _llada_names),
    Family("dream", ("Dream", "dream"), _dream_config, _dream_names),
)


def family_for(model_type: str | None, source: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted({t for f in FAMILIES for t in f.model_types})
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {known}")


def family_named(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f"unknown model family {name!r}; known: {[f.name for f in FAMILIES]}")
