"""Strict conversion of plain YAML data into attrs classes, with errors that name the key path.

Written here rather than taken from cattrs because every message must carry the file, the dotted
key path, the bad value and what is allowed (the allowed keys for an unknown key, the allowed
choices for a bad choice); cattrs' grouped exceptions do not list allowed keys.
"""

from __future__ import annotations

import math
import re
import types
import typing

import attrs


class ConfigError(ValueError):
    """Bad configuration; the message names the source file, the key path and the value."""


def _describe(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def convert(tp, value, path: str, source: str):
    """`value` converted to annotation `tp`, or a ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, path, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {path} = {value!r}: expected a list")
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        return tuple(convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(value))
    if attrs.has(tp):
        return structure(tp, value, path, source)
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = _number_text(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if isinstance(value, float) or abs(value) < 2 ** 1023 else math.inf
            if not math.isfinite(number):
                shown = value if isinstance(value, float) else f"{str(value)[:12]}... ({len(str(value))} digits)"
                raise ConfigError(f"{source}: {path} = {shown}: expected a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{source}: {path} = {value!r}: expected a list, got {type(value).__name__}")
    else:
        return value
    raise ConfigError(f"{source}: {path} = {value!r}: expected {_describe(tp)}, got {type(value).__name__}")


# a number in exponent form without a dot (1e-3), which YAML 1.1 (PyYAML) reads as a string
_EXPONENT_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _number_text(text: str):
    """`text` as a float when YAML 1.2 would read it as one but YAML 1.1 does not, else unchanged."""
    return float(text) if _EXPONENT_NUMBER.fullmatch(text.strip()) else text


def structure(cls, data, path: str, source: str):
    """An instance of attrs class `cls` from mapping `data`; unknown keys and bad values are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {path or 'top level'}: expected a mapping, got {type(data).__name__} {data!r}")
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{source}: {prefix}{key}: unknown key; allowed keys: {sorted(fields)}")
    kwargs = {k: convert(fields[k].type, v, f"{prefix}{k}", source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {path or 'top level'}: {exc}") from exc


def choice(*allowed):
    """attrs validator: the value is one of `allowed`."""

    def check(instance, attribute, value):
        if value not in allowed:
            raise ValueError(f"{attribute.name} = {value!r}: allowed values: {list(allowed)}")

    return check


def _finite(attribute, value) -> None:
    """A bool, a non-number, NaN or an infinity is not a valid numeric option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                           and not math.isfinite(value)):
        raise ValueError(f"{attribute.name} = {value!r}: expected a finite number")


def at_least(bound, strict: bool = False):
    """attrs validator: a finite number >= bound (> bound when strict); None passes."""

    def check(instance, attribute, value):
        if value is None:
            return
        _finite(attribute, value)
        if value < bound or (strict and value == bound):
            raise ValueError(f"{attribute.name} = {value!r}: must be {'>' if strict else '>='} {bound}")

    return check


def in_range(low, high, include_high: bool = True):
    """attrs validator: a finite number with low <= value <= high (< high when not include_high); a
    bool is not a number here, as in `convert`."""

    def check(instance, attribute, value):
        _finite(attribute, value)
        if not low <= value <= high or (not include_high and value == high):
            raise ValueError(f"{attribute.name} = {value!r}: must be between {low} and {high}"
                             + ("" if include_high else f", {high} excluded"))

    return check
