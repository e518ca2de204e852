"""One rule for the types of option values: what a bool, int, float or str field of a config accepts.

A bool takes only ``True``/``False`` (YAML's true/false; no strings, no 0/1); an int takes an
integer (not a bool); a float takes any number (not a bool); a str takes a string. Each may also
be ``None`` when the field is declared ``X | None``. Fields of other types (``Literal`` choices,
dicts) are left to the config's own checks.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

from formerkit.errors import ConfigError

_PLAIN = (bool, int, float, str)


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Fields of dataclass ``cls`` declared bool, int, float or str (or ``X | None``): name -> (type, optional)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        plain = [a for a in args if a is not type(None)]
        if len(plain) == 1 and plain[0] in _PLAIN:
            out[name] = (plain[0], len(plain) < len(args))
    return out


def describe(kind: type, optional: bool = False) -> str:
    """What a value of ``kind`` must be, in words: 'true or false', 'an integer', 'a number or null', ..."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    return f"{words} or null" if optional else words


def is_valid(value: Any, kind: type, optional: bool = False) -> bool:
    """Whether ``value`` is acceptable for a field of ``kind`` (bool, int, float or str; None when optional)."""
    if value is None:
        return optional
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_fields(obj: Any, prefix: str = "", only: tuple[type, ...] = _PLAIN) -> None:
    """Raise ConfigError naming ``prefix + field``, what it must be and what it got, for the first mistyped field.

    ``only`` limits the check to fields declared of those types (e.g. ``(bool,)``).
    """
    for name, (kind, optional) in field_types(type(obj)).items():
        value = getattr(obj, name)
        if kind in only and not is_valid(value, kind, optional):
            raise ConfigError(f"{prefix}{name} must be {describe(kind, optional)}, got {value!r}")
