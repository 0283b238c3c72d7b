"""Strict conversion of plain YAML data into attrs classes, with errors that name the key path.

Written here rather than taken from cattrs because every message must carry the file, the dotted
key path, the bad value and what is allowed (the allowed keys for an unknown key, the allowed
choices for a bad choice); cattrs' grouped exceptions do not list allowed keys. Every mistake of
a mapping is collected and raised as one ConfigError, so a file's errors are reported at once.
"""

from __future__ import annotations

import math
import re
import reprlib
import types
import typing

import attrs


class ConfigError(ValueError):
    """Bad configuration; the message names the source file, the key path and the value.

    One ConfigError may report several mistakes of a file at once: `errors` holds one message each,
    and the message is those lines."""

    def __init__(self, message: str = "", errors: typing.Sequence[str] = ()):
        self.errors = list(errors) or [message]
        super().__init__("\n".join(self.errors))

    @classmethod
    def combine(cls, errors: typing.Sequence[ConfigError]) -> ConfigError:
        """One error reporting every message of `errors` (each once, in order)."""
        if len(errors) == 1:
            return errors[0]
        return cls(errors=list(dict.fromkeys(m for e in errors for m in e.errors)))


class _Shown(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 4, 80, 80, 40
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 8

    def repr_int(self, x, level):
        if x.bit_length() <= 128:
            return super().repr_int(x, level)
        try:
            text = str(x)
        except ValueError:  # Python refuses to write integers of more than 4300 digits
            return f"an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits"
        return f"{text[:12]}... ({len(text.lstrip('-'))} digits)"


_SHOWN = _Shown()


def shown(value) -> str:
    """`value` as an error message shows it: its repr, long strings, lists and numbers cut short with
    their full length said, so a huge value never makes a huge message."""
    text = _SHOWN.repr(value)
    if isinstance(value, str) and len(value) > _SHOWN.maxstring:
        text += f" ({len(value)} characters)"
    elif isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > _SHOWN.maxlist:
        text += f" ({len(value)} items)"
    return text


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
            raise ConfigError(f"{source}: {path} = {shown(value)}: expected a list")
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        items, errors = [], []
        for i, v in enumerate(value):
            try:
                items.append(convert(item, v, f"{path}[{i}]", source))
            except ConfigError as exc:
                errors.append(exc)
        if errors:
            raise ConfigError.combine(errors)
        return tuple(items)
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
                raise ConfigError(f"{source}: {path} = {shown(value)}: expected a finite number")
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
        raise ConfigError(f"{source}: {path} = {shown(value)}: expected a list, got {type(value).__name__}")
    else:
        return value
    raise ConfigError(f"{source}: {path} = {shown(value)}: expected {_describe(tp)}, got {type(value).__name__}")


# a number in exponent form without a dot (1e-3), which YAML 1.1 (PyYAML) reads as a string
_EXPONENT_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _number_text(text: str):
    """`text` as a float when YAML 1.2 would read it as one but YAML 1.1 does not, else unchanged."""
    return float(text) if _EXPONENT_NUMBER.fullmatch(text.strip()) else text


def structure(cls, data, path: str, source: str):
    """An instance of attrs class `cls` from mapping `data`; unknown keys and bad values are errors.
    Fields marked `metadata={"internal": True}` are set by the loader, never read from a file."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {path or 'top level'}: expected a mapping, got {type(data).__name__} {shown(data)}")
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init and not f.metadata.get("internal")}
    prefix = f"{path}." if path else ""
    errors, kwargs = [], {}
    for key, value in data.items():  # every key: all mistakes of a file are reported at once
        if key not in fields:
            named = key if isinstance(key, str) and len(key) <= 80 else shown(key)
            errors.append(ConfigError(f"{source}: {prefix}{named}: unknown key; allowed keys: {sorted(fields)}"))
            continue
        try:
            kwargs[key] = convert(fields[key].type, value, f"{prefix}{key}", source)
        except ConfigError as exc:
            errors.append(exc)
    errors += [ConfigError(f"{source}: {path or 'top level'}: {exc}") for exc in _validator_errors(cls, kwargs)]
    if errors:
        raise ConfigError.combine(errors)
    try:  # checks across fields (__attrs_post_init__) run once every field is valid
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {path or 'top level'}: {exc}") from exc


def _validator_errors(cls, kwargs: dict) -> list[Exception]:
    """The ValueErrors / TypeErrors of every given field's validator, each run on its own.

    attrs stops at the first failing validator; here each runs against a draft instance holding the
    given values and the defaults (a validator may read other fields). A field with a converter is
    left to the constructor, which converts before validating."""
    fields = attrs.fields_dict(cls)
    draft = object.__new__(cls)
    for name, f in fields.items():
        if name in kwargs:
            value = kwargs[name]
        elif isinstance(f.default, attrs.Factory) and f.default.takes_self:
            continue  # built from the finished instance: only the constructor can
        elif isinstance(f.default, attrs.Factory):
            value = f.default.factory()
        elif f.default is not attrs.NOTHING:
            value = f.default
        else:
            continue
        object.__setattr__(draft, name, value)  # frozen classes: bypass their __setattr__
    errors = []
    for name, value in kwargs.items():
        f = fields[name]
        if f.validator is None or f.converter is not None:
            continue
        try:
            f.validator(draft, f, value)
        except (ValueError, TypeError) as exc:
            errors.append(exc)
        except AttributeError:  # it reads a field only the constructor builds: checked there
            pass
    return errors


def choice(*allowed):
    """attrs validator: the value is one of `allowed`."""

    def check(instance, attribute, value):
        if value not in allowed:
            raise ValueError(f"{attribute.name} = {shown(value)}: allowed values: {list(allowed)}")

    return check


def _finite(attribute, value) -> None:
    """A bool, a non-number, NaN or an infinity is not a valid numeric option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                           and not math.isfinite(value)):
        raise ValueError(f"{attribute.name} = {shown(value)}: expected a finite number")


def at_least(bound, strict: bool = False):
    """attrs validator: a finite number >= bound (> bound when strict); None passes."""

    def check(instance, attribute, value):
        if value is None:
            return
        _finite(attribute, value)
        if value < bound or (strict and value == bound):
            raise ValueError(f"{attribute.name} = {shown(value)}: must be {'>' if strict else '>='} {bound}")

    return check


def in_range(low, high, include_high: bool = True):
    """attrs validator: a finite number with low <= value <= high (< high when not include_high); a
    bool is not a number here, as in `convert`."""

    def check(instance, attribute, value):
        _finite(attribute, value)
        if not low <= value <= high or (not include_high and value == high):
            raise ValueError(f"{attribute.name} = {shown(value)}: must be between {low} and {high}"
                             + ("" if include_high else f", {high} excluded"))

    return check


def non_empty_strings(instance, attribute, value):
    """attrs validator: a sequence of strings, none empty (an empty stop string matches everywhere)."""
    if any(text == "" for text in value):
        raise ValueError(f"{attribute.name} = {shown(list(value))}: an empty string is not allowed (it would match "
                         f"at every position); give non-empty strings or leave the key out")


def layer_indices(instance, attribute, value):
    """attrs validator: a tuple of layer indices, each >= 0 (the upper bound is checked per model)."""
    bad = [v for v in value if v < 0]
    if bad:
        raise ValueError(f"{attribute.name} = {shown(list(value))}: layer indices must be >= 0")
