"""The decoding core: the denoising loop (loop.py, read top to bottom), its state, the forward plan,
commit schedules and sampling, the hook specifications every plugin implements, the plugin base
class and registry, generation statistics, streaming, the activation store and the layer-reuse
protocol the loop and the model share.

The names a plugin imports are re-exported here:

    from dare_pipeline.core import ForwardPlan, Plugin, hookimpl
"""

from .hookspecs import hookimpl, hookspec
from .layer_reuse import LayerCall, LayerReuse, ReuseSet
from .loop import StepBudgetExceeded, denoise
from .plan import ForwardPlan
from .plugin import DECISIONS, NoOptions, Plugin
from .registry import PluginLoadError, available_plugins, registered
from .sampling import Proposal, descending_rank, propose, top_k_mask
from .schedule import linear_counts, linear_min_forwards, timestep_count, timestep_min_forwards
from .state import DecodeState
from .stats import GenerationStats, RowCounter
from .store import ATTN_OUT, FFN_OUT, ActivationStore
from .streaming import GenerationCancelled, GenerationStream, PromptStep, StepEvent

__all__ = [
    "ATTN_OUT",
    "DECISIONS",
    "FFN_OUT",
    "ActivationStore",
    "DecodeState",
    "ForwardPlan",
    "GenerationCancelled",
    "GenerationStats",
    "GenerationStream",
    "LayerCall",
    "LayerReuse",
    "NoOptions",
    "Plugin",
    "PluginLoadError",
    "PromptStep",
    "Proposal",
    "ReuseSet",
    "RowCounter",
    "StepBudgetExceeded",
    "StepEvent",
    "available_plugins",
    "denoise",
    "descending_rank",
    "hookimpl",
    "hookspec",
    "linear_counts",
    "linear_min_forwards",
    "propose",
    "registered",
    "timestep_count",
    "timestep_min_forwards",
    "top_k_mask",
]
