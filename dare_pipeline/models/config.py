"""One architecture description shared by every model family.

LLaDA and Dream are both pre-norm RMSNorm/SwiGLU/RoPE transformers with bidirectional attention;
they differ in tensor names, biases, GQA and the one-position logit shift. A family module turns
its checkpoint's config.json into this class; the transformer only ever reads this class.
"""

from __future__ import annotations

import attrs


def _positive(instance, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class ModelConfig:
    family: str  # "llada" or "dream"
    d_model: int = attrs.field(validator=_positive)
    n_layers: int = attrs.field(validator=_positive)
    n_heads: int = attrs.field(validator=_positive)
    n_kv_heads: int = attrs.field(validator=_positive)
    ffn_hidden: int = attrs.field(validator=_positive)
    vocab_size: int = attrs.field(validator=_positive)
    # rows of the embedding / LM head; LLaDA may pad it above vocab_size
    embedding_size: int = attrs.field(validator=_positive)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # Dream predicts token j from position j-1; LLaDA predicts token j at position j.
    logits_shift: bool = False
    mask_token_id: int = attrs.field()
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    # extra ids that end an answer (LLaDA-8B-Instruct's <|eot_id|>); stop ids = eos + these
    extra_stop_ids: tuple[int, ...] = ()

    @n_kv_heads.validator
    def _check_gqa(self, attribute, value):
        if self.n_heads % value:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({value})")

    @property
    def head_dim(self) -> int:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads})")
        return self.d_model // self.n_heads

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        return tuple(dict.fromkeys(ids + list(self.extra_stop_ids)))
