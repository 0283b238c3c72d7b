"""How the model's forwards run on the device: the recipe's `execution:` section.

    execution:
      mode: auto          # auto | eager | compiled | cuda_graphs
      backend: inductor   # torch.compile backend (aot_eager: capture without code generation)
      fullgraph: true     # a graph break is an error, not a silent slow path
      regions: true       # compile the code every layer repeats once (execution/regions.py), not once per layer

`auto` is eager on the CPU and cuda_graphs on CUDA (inductor plus CUDA graphs: one launch per
forward instead of ~1,500). On the CPU inductor's code is 1.0-1.2x faster per generation and
compiling costs 2-23 s, which a command that decodes a few prompts never earns back
(docs/benchmarks.md).
"""

from __future__ import annotations

import attrs

from .loading import choice

MODES = ("auto", "eager", "compiled", "cuda_graphs")


@attrs.frozen(kw_only=True)
class ExecutionConfig:
    mode: str = attrs.field(default="auto", validator=choice(*MODES))
    backend: str = attrs.field(default="inductor", validator=choice("inductor", "aot_eager", "eager"))
    fullgraph: bool = True
    regions: bool = True

    def resolved_mode(self, device_type: str) -> str:
        """The concrete mode on a device of `device_type` ("cpu", "cuda", ...)."""
        if self.mode != "auto":
            return self.mode
        return "cuda_graphs" if device_type == "cuda" else "eager"
