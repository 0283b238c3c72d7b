"""Model families: how a checkpoint's config.json and tensor names map onto the shared transformer.

A family knows three things: its config fields, its state-dict names, and whether its logits are
shifted by one position. Adding a family (another LLaDA/Dream kin) means adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from .config import ModelConfig
from .config_reader import REQUIRED, MAX_LAYERS, MAX_POSITIONS, ConfigReader, ConfigValueError, shown

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
    # ModelConfig field -> the config.json key it comes from, for what decides the tensors' shapes
    keys: dict[str, str] = attrs.Factory(dict)

    def describe(self, cfg: ModelConfig) -> str:
        """The config.json values the weights' names and shapes follow from: "d_model = 192, ..."."""
        values = {key: getattr(cfg, field) for field, key in self.keys.items()}
        return ", ".join(f"{key} = {str(v).lower() if isinstance(v, bool) else v}" for key, v in values.items())


def _build(keys: dict[str, str], **fields) -> ModelConfig:
    """The ModelConfig of `fields` after the checks across values, which name config.json's keys
    (`keys`: our field -> theirs)."""
    def name(field):
        return f"{keys[field]} = {fields[field]}"

    if fields["d_model"] % fields["n_heads"]:
        raise ConfigValueError(f"{name('d_model')} is not divisible by {name('n_heads')}")
    if fields["d_model"] // fields["n_heads"] % 2:
        raise ConfigValueError(f"{name('d_model')} / {name('n_heads')} = {fields['d_model'] // fields['n_heads']}: "
                               f"rotary embeddings need an even head size")
    if fields["n_heads"] % fields["n_kv_heads"]:
        raise ConfigValueError(f"{name('n_heads')} is not a multiple of {name('n_kv_heads')}")
    if fields["embedding_size"] < fields["vocab_size"]:
        raise ConfigValueError(f"{name('embedding_size')} is smaller than {name('vocab_size')}: every token needs "
                               f"an embedding row")
    return ModelConfig(**fields)


# ---- LLaDA -------------------------------------------------------------------------------------
_LLADA_KEYS = {"d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
               "ffn_hidden": "mlp_hidden_size", "vocab_size": "vocab_size", "embedding_size": "embedding_size",
               "qkv_bias": "include_qkv_bias", "tie_word_embeddings": "weight_tying"}


# config.json keys of the reference LLaDA (OLMo-style) model that change its outputs, with the values
# this transformer implements (RMSNorm, SiLU-gated FFN, unscaled and unclipped, no extra norms)
_LLADA_IMPLEMENTED = {"activation_type": ("silu",), "layer_norm_type": ("rms",), "scale_logits": (False,),
                      "clip_qkv": (), "input_emb_norm": (False,), "attention_layer_norm": (False,),
                      "multi_query_attention": (False,)}


def _llada_config(raw: dict) -> ModelConfig:
    r = ConfigReader(raw, "llada")
    r.implemented(_LLADA_IMPLEMENTED)
    block_type = r.value("block_type", "llama")
    if block_type != "llama":
        raise ConfigValueError(f"block_type = {shown(block_type)}: not supported; supported: 'llama'")
    rope, alibi = r.flag("rope", True), r.flag("alibi", False)
    if alibi or not rope:
        raise ConfigValueError(f"rope = {str(rope).lower()}, alibi = {str(alibi).lower()}: only RoPE position "
                               f"encoding is supported (rope = true, alibi = false)")
    d = r.int("d_model")
    n_heads = r.int("n_heads")
    vocab = r.int("vocab_size")
    if raw.get("mlp_hidden_size") is not None:
        ffn = r.int("mlp_hidden_size")
    else:
        ratio = r.number("mlp_ratio", 4)
        if not float(ratio * d).is_integer():
            raise ConfigValueError(f"mlp_ratio = {shown(raw.get('mlp_ratio'))} x d_model = {d} is not a whole number "
                                   f"of hidden units; give mlp_hidden_size")
        ffn = int(ratio * d)
    return _build(
        _LLADA_KEYS, family="llada", d_model=d, n_layers=r.int("n_layers", high=MAX_LAYERS), n_heads=n_heads,
        n_kv_heads=r.int("n_kv_heads", n_heads), ffn_hidden=ffn,
        vocab_size=vocab, embedding_size=r.int("embedding_size", vocab),
        rope_theta=r.number("rope_theta", 10000.0), rms_norm_eps=r.number("rms_norm_eps", 1e-5, below=1),
        max_sequence_length=r.int("max_sequence_length", 4096, high=MAX_POSITIONS),
        qkv_bias=r.flag("include_bias", False) or r.flag("include_qkv_bias", False),
        tie_word_embeddings=r.flag("weight_tying", False), logits_shift=False,
        mask_token_id=r.value("mask_token_id", REQUIRED), eos_token_id=r.value("eos_token_id"),
        pad_token_id=r.value("pad_token_id"), bos_token_id=r.value("bos_token_id"),
        extra_stop_ids=r.int_list("eot_token_ids"),
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
_DREAM_KEYS = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
               "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size", "vocab_size": "vocab_size",
               "tie_word_embeddings": "tie_word_embeddings"}
_DREAM_CHECKS = {**_DREAM_KEYS, "embedding_size": "vocab_size"}


# Qwen2-layout keys that change Dream's outputs, with the values this transformer implements (SiLU,
# plain RoPE, full attention)
_DREAM_IMPLEMENTED = {"hidden_act": ("silu",), "rope_scaling": (), "use_sliding_window": (False,)}


def _dream_config(raw: dict) -> ModelConfig:
    r = ConfigReader(raw, "Dream")
    r.implemented(_DREAM_IMPLEMENTED)
    n_heads = r.int("num_attention_heads")
    vocab = r.int("vocab_size")
    return _build(
        _DREAM_CHECKS, family="dream", d_model=r.int("hidden_size"), n_layers=r.int("num_hidden_layers", high=MAX_LAYERS),
        n_heads=n_heads, n_kv_heads=r.int("num_key_value_heads", n_heads), ffn_hidden=r.int("intermediate_size"),
        vocab_size=vocab, embedding_size=vocab, rope_theta=r.number("rope_theta", 10000.0),
        rms_norm_eps=r.number("rms_norm_eps", 1e-6, below=1),
        max_sequence_length=r.int("max_position_embeddings", 4096, high=MAX_POSITIONS), qkv_bias=True,
        tie_word_embeddings=r.flag("tie_word_embeddings", False), logits_shift=True,
        mask_token_id=r.value("mask_token_id", REQUIRED), eos_token_id=r.value("eos_token_id"),
        pad_token_id=r.value("pad_token_id"), bos_token_id=r.value("bos_token_id"),
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
    Family("llada", ("llada", "LLaDA"), _llada_config, _llada_names, _LLADA_KEYS),
    Family("dream", ("Dream", "dream"), _dream_config, _dream_names, _DREAM_KEYS),
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
