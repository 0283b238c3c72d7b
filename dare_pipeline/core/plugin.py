"""The plugin base class: what a built-in or third-party plugin declares about itself.

A plugin is a class found through the `dare_pipeline` entry-point group. One instance is made
per recipe entry, with its validated options; `dare_generation_start` must reset whatever state
the instance keeps, because the same instance serves every generation of a pipeline.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

# Decisions a plugin may own; a recipe with two owners of one decision is refused at load time.
DECISIONS = ("commit_policy", "row_feed", "layer_rows", "kv_rows", "attn_rows", "ffn_rows")


@attrs.frozen
class NoOptions:
    """Options of a plugin that takes none."""


class Plugin:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # decisions this plugin owns (see DECISIONS)
    provides: ClassVar[frozenset[str]] = frozenset()
    # plugin name -> why the two cannot be combined
    conflicts: ClassVar[dict[str, str]] = {}
    # options under which the plugin must reproduce the tokens of the same recipe without it
    # (the contract test checks it); None where no such setting exists (e.g. a decoding policy)
    exact_options: ClassVar[dict[str, Any] | None] = None
    # the d_model-wide row fields per layer its reuse keeps in the activation store (store.field
    # names; one shared by two plugins, such as ATTN_OUT, is one tensor), which the memory estimate
    # counts; None: not declared, estimated as two for a plugin that owns a layer decision
    store_fields: ClassVar[frozenset[str] | None] = None

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def contract_options(cls, model, directory) -> dict[str, Any] | None:
        """Options the plugin contract (`plugin_kit.checks`) runs this plugin with on its tiny random
        `model`, for a plugin whose defaults cannot run there (guided diffusion needs a guide of the
        model's vocabulary: it saves one into `directory`, an empty folder of its own). None: the
        defaults."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
