"""The YAML dialect of configs and the check of a value against a field's type annotation (used by config.py)."""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal

import yaml

# YAML 1.1 (PyYAML) reads `1e-3` as a string and `2024-01-01` as a date; a config wants a float and a string.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")


class Loader(yaml.SafeLoader):
    pass


class Dumper(yaml.SafeDumper):
    pass


for _cls in (Loader, Dumper):
    _cls.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:timestamp"]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+.0123456789"))
Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


class Mismatch(Exception):
    """Internal: a value does not fit a type annotation."""


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` (int -> float is the only conversion) or raise :class:`Mismatch`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg)
            except Mismatch:
                pass
    elif origin is list and isinstance(value, list):
        return [coerce(v, args[0]) for v in value]
    elif origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    elif tp is type(None) and value is None:
        return None
    elif isinstance(value, bool) or tp is bool:
        if tp is bool and isinstance(value, bool):
            return value
    elif tp is float and isinstance(value, (int, float)):
        return float(value)
    elif tp in (int, str) and isinstance(value, tp):
        return value
    raise Mismatch


def describe(tp: Any) -> str:
    """Human name of a type annotation, for error messages: 'a float', 'true, false or a string', ..."""
    names = {int: "an int", float: "a float", bool: "true or false", str: "a string", type(None): "null"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return f"a list of {describe(args[0]).split(' ', 1)[1]}s, e.g. [a, b]"
    if origin is dict:
        return "a mapping, e.g. {key: value}"
    if args:
        return " or ".join(describe(a) for a in args).replace("true or false or", "true, false or")
    return names.get(tp, str(tp))
