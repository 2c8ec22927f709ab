"""Dataclass configs from YAML, with dotted command-line overrides.

A config is a (nested) dataclass; its defaults live in code, a YAML file
overrides them, and ``--set key.path=value`` overrides both. Every key is
checked: an unknown key or a value of the wrong type is a
`ConfigError` naming the key path and the expected type.

Examples:
  >>> import dataclasses
  >>> from titanax.launch.config import load
  >>> @dataclasses.dataclass
  ... class Optimizer:
  ...     lr: float = 1e-3
  ...     weight_decay: float = 0.0
  >>> @dataclasses.dataclass
  ... class Config:
  ...     steps: int = 100
  ...     optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)
  >>> load(Config, overrides=["optimizer.lr=3e-4", "steps=20"])
  Config(steps=20, optimizer=Optimizer(lr=0.0003, weight_decay=0.0))
  >>> load(Config, overrides=["optimizer.lrr=1"])
  Traceback (most recent call last):
  ...
  titanax.errors.ConfigError: config key 'optimizer.lrr' (from --set optimizer.lrr=1) is unknown; the keys of 'optimizer' are lr, weight_decay. Did you mean 'optimizer.lr'?
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from titanax.errors import ConfigError

__all__ = ["load", "to_dict"]

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for logging, or for saving next to a checkpoint)."""
    return dataclasses.asdict(config)


def _hints(cls: Any) -> dict[str, Any]:
    """Field types, resolving string annotations; a section's class is found from its default."""
    local: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if isinstance(factory, type):
            local[factory.__name__] = factory
        elif f.default is not dataclasses.MISSING and f.default is not None:
            local[type(f.default).__name__] = type(f.default)
    return typing.get_type_hints(cls, localns=local)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                continue
        raise _wrong(key, value, tp, where)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"config key {key!r}{where} must be one of {', '.join(map(repr, args))}; got {value!r}."
        )
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, value, tp, where)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong(key, value, tp, where)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _wrong(key, value, tp, where)
        return _build(tp, value, key, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _wrong(key, value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _wrong(key, value, tp, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        raise _wrong(key, value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(key, value, tp, where)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _wrong(key, value, tp, where)
    return value


def _wrong(key: str, value: Any, tp: Any, where: str) -> ConfigError:
    return ConfigError(
        f"config key {key!r}{where} must be {_type_name(tp)}; got {value!r} "
        f"({type(value).__name__})."
    )


def _build(cls: Any, values: Mapping[str, Any], prefix: str, where: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown(key, prefix, list(fields), where)
        kwargs[name] = _coerce(value, hints[name], key, where)
    return cls(**kwargs)


def _unknown(key: str, prefix: str, known: list[str], where: str) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    owner = f"the keys of {prefix!r} are" if prefix else "the top-level keys are"
    return ConfigError(f"config key {key!r}{where} is unknown; {owner} {', '.join(known)}.{hint}")


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[path[-1]] = value


def load(
    cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> T:
    """Builds the dataclass ``cls`` from its defaults, a YAML file and ``key.path=value`` overrides.

    Args:
      cls: a dataclass, possibly with dataclass fields (sections).
      path: a YAML file (read with ``yaml.safe_load``; no code runs); ``None``
        for the defaults.
      overrides: ``"optimizer.lr=1e-3"`` strings, applied in order; values are
        read as YAML and converted to the field's type.

    Raises:
      ConfigError: an unknown key, a value of the wrong type, a malformed
        override, or a file that is not a YAML mapping.
    """
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"config: {cls!r} is not a dataclass.")
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"config: cannot read {os.fspath(path)}: {e.strerror}.") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {os.fspath(path)} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config: {os.fspath(path)} must hold a mapping of keys to values.")
        values = loaded or {}
        _build(cls, values, "", f" (in {os.fspath(path)})")  # check the file on its own
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config: override {item!r} must look like key.path=value.")
        where = f" (from --set {item})"
        tp = _check_path(cls, key.strip().split("."), where)
        value = _coerce(yaml.safe_load(text) if text else "", tp, key.strip(), where)
        _merge(values, key.strip().split("."), _plain(value))
    return typing.cast(T, _build(cls, values, "", ""))


def _plain(value: Any) -> Any:
    """A coerced value back as YAML-like data (sections as dicts), to merge and rebuild."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _check_path(cls: Any, parts: list[str], where: str) -> Any:
    """Checks that ``parts`` names a field; returns its type."""
    node, prefix = cls, ""
    for part in parts:
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"config key {prefix!r}{where} is not a section; it has no {part!r}.")
        known = [f.name for f in dataclasses.fields(node)]
        key = f"{prefix}.{part}" if prefix else part
        if part not in known:
            raise _unknown(key, prefix, known, where)
        node, prefix = _hints(node)[part], key
    return node


def from_argv(
    cls: type[T], argv: Sequence[str], *, default: str | os.PathLike[str] | None = None
) -> T:
    """A config from command-line arguments: ``--config FILE``, ``--set key=value`` (repeatable),
    and the shorthand ``--key value`` (dashes become underscores: ``--batch-size 64``).

    Examples:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class Config:
      ...     steps: int = 100
      ...     batch_size: int = 32
      >>> from_argv(Config, ["--steps", "5", "--set", "batch_size=8"])
      Config(steps=5, batch_size=8)
    """
    path: str | os.PathLike[str] | None = default
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"config: unexpected argument {arg!r}; use --key value or --set k=v.")
        name, eq, inline = arg[2:].partition("=")
        if eq:
            value = inline
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 1
        else:
            raise ConfigError(f"config: {arg} needs a value.")
        if name == "config":
            path = value
        elif name == "set":
            overrides.append(value)
        else:
            overrides.append(f"{name.replace('-', '_')}={value}")
        i += 1
    return load(cls, path, overrides)
