"""What is skipped: the tools reuse plugins are built from.

- the layer-reuse protocol (`LayerReuse`, `ReuseSet`, `LayerCall`) and the activation store's
  fields (`ATTN_OUT`, `FFN_OUT`), which live in the core because the loop and the model share them;
- `QueryDrift`, `DriftHooks`, `ShadowLog` (drift.py): DARE's per-row drift decision and shadow mode;
- `KVCacheFeeder` (kv_cache.py): the row feeder of the KV-caching plugins;
- `flops`: the FLOPs a forward computes and what reuse saved.

    from dare_pipeline.reuse import ATTN_OUT, LayerReuse, QueryDrift
"""

from ..core.layer_reuse import LayerCall, LayerReuse, ReuseSet
from ..core.store import ATTN_OUT, FFN_OUT, ActivationStore
from . import flops
from .drift import REASONS, WHOLE_LAYER_REUSE, DriftHooks, QueryDrift, ShadowLog
from .kv_cache import KVCacheFeeder

__all__ = [
    "ATTN_OUT",
    "FFN_OUT",
    "REASONS",
    "WHOLE_LAYER_REUSE",
    "ActivationStore",
    "DriftHooks",
    "KVCacheFeeder",
    "LayerCall",
    "LayerReuse",
    "QueryDrift",
    "ReuseSet",
    "ShadowLog",
    "flops",
]
