"""Reading a checkpoint's config.json values, each with its type and range.

JSON has no NaN in its standard but Python's reader accepts `NaN` and `Infinity`; `true` is an
integer to Python and `4.0` is not; a negative or zero size makes torch raise deep inside a layer.
Every value is checked here before anything is built, and an error names the key as config.json
spells it and the value. Sizes have upper bounds only where a bound is a fact of the architecture
(the loop's positions, the number of layers it is sane to build); how large a model may be is decided
by the memory estimate (`models/memory.py`) against the device the weights go to.
"""

from __future__ import annotations

import math
import reprlib

# a transformer of more layers than this is a typo (published ones have up to ~130); each layer
# is a module with nine parameters, built before any weight is read
MAX_LAYERS = 1024
# positions are float32 in RoPE (integers up to 2^24 are exact)
MAX_POSITIONS = 1 << 24
REQUIRED = object()


class ConfigValueError(ValueError):
    """A config.json value of the wrong type or out of range; the message names the key and value."""


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 3


def shown(value) -> str:
    """A value as an error message shows it: cut short (`reprlib`), with its length when long."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = _SHORT.repr(value)
    if isinstance(value, str) and len(value) > _SHORT.maxstring:
        text += f" ({len(value)} characters)"
    elif isinstance(value, (list, dict)) and len(value) > _SHORT.maxlist:
        text += f" ({len(value)} items)"
    return text


class ConfigReader:
    """config.json's mapping with checked reads; `family` names the family in messages."""

    def __init__(self, raw: dict, family: str):
        self.raw, self.family = raw, family

    def _get(self, key: str, default):
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is REQUIRED:
            raise ConfigValueError(f"missing required key {key!r} (model_type {self.family!r})")
        return default

    def int(self, key: str, default=REQUIRED, low: int = 1, high: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigValueError(f"{key} = {shown(value)}: expected an integer")
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"from {low} to {high}"
            raise ConfigValueError(f"{key} = {shown(value)}: expected an integer {allowed}")
        return value

    def number(self, key: str, default=REQUIRED, below: float | None = None) -> float:
        """A finite number > 0 (and < `below`)."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigValueError(f"{key} = {shown(value)}: expected a number")
        number = float(value) if not isinstance(value, int) or abs(value) < 2 ** 1023 else math.inf
        if not math.isfinite(number) or number <= 0 or (below is not None and number >= below):
            allowed = "a finite number > 0" + (f" and < {below}" if below is not None else "")
            raise ConfigValueError(f"{key} = {shown(value)}: expected {allowed}")
        return number

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigValueError(f"{key} = {shown(value)}: expected true or false")
        return value

    def implemented(self, supported: dict[str, tuple]) -> None:
        """Keys that change what the model computes: each absent (or null) or one of the values this
        code implements (`supported`: key -> those values), so that a checkpoint needing another is
        refused rather than loaded to compute other logits in silence."""
        for key, allowed in supported.items():
            value = self.raw.get(key)
            if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
                implemented = ", ".join(shown(a) for a in allowed)
                raise ConfigValueError(f"{key} = {shown(value)}: not supported (model_type {self.family!r}); "
                                       f"supported: {implemented + ' or ' if implemented else ''}null / absent")

    def value(self, key: str, default=None):
        """A value checked elsewhere (special token ids: against the embedding, once its size is known)."""
        return self._get(key, default)

    def int_list(self, key: str) -> tuple[int, ...]:
        value = self._get(key, ())
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(f"{key} = {shown(value)}: expected a list of token ids")
        return tuple(value)
