"""Typed recipes: YAML (safe-loaded) into nested dataclasses, dotted overrides, one-line errors.

Every component declares its own dataclass; this module only knows how to fill a dataclass from
plain data and how to say, in one line naming the key, why it could not. It imports no torch so a
bad recipe fails in a fraction of a second, before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

import yaml


class UsageError(ValueError):
    """The user's input is wrong (a flag, a path, a file): one line, and the CLI exits with status 2."""


class ConfigError(UsageError):
    """A recipe key or value is wrong; the line names the key."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(_convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp in (int, float) and isinstance(value, str):
        value = _yaml_number(value)  # PyYAML reads 4e-6 (no dot) as a string; users mean a number
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 1.28e9 in YAML is a float; accept it when it is whole
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def _yaml_number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError.

    A key that moved elsewhere is named in the class's `moved_keys` (key: where it went), so its
    error points there instead of listing the fields.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    moved = vars(cls).get("moved_keys", {})
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key in moved:
            raise ConfigError(f"'{full}' is not a {cls.__name__} key; {moved[key]}")
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; {cls.__name__} has: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default is missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)  # components may check their own invariants
    if validate is not None:
        validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (lists, not tuples), safe to dump as YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{where}' is not an index into a list of {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override '{dotted}': '{where}' is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': '{last}' is not an index into a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (`1e-3`, `true`, `[1, 2]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, dotted.strip(), value)
    return tree


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"recipe file '{path}' does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(data).__name__}")
    return data


def check(condition: bool, message: str, error: type[UsageError] = ConfigError) -> None:
    """Raise `error`(message) unless `condition`: the one-liner recipes (ConfigError) and command-line
    flags (UsageError) are validated with."""
    if not condition:
        raise error(message)


def check_flag(condition: bool, message: str) -> None:
    """Raise UsageError(message) unless `condition`: for command-line flags, which are not a recipe."""
    check(condition, message, UsageError)
