"""The embedded default model: checkpoints shipped inside the package, used when a recipe says `model: default`."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
# name -> directory; "default" is the LLaDA-architecture model
EMBEDDED = {"default": HERE / "llada", "default-llada": HERE / "llada", "default-dream": HERE / "dream"}
# the embedded guide of guided diffusion (a causal LM with the embedded models' tokenizer)
GUIDE = HERE / "guide"


def resolve_model_path(path: str | Path) -> Path:
    """An embedded model's directory for its name, else the path itself."""
    if isinstance(path, str) and path in EMBEDDED:
        return EMBEDDED[path]
    return Path(path).expanduser()
