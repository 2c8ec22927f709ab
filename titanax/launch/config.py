"""Dataclass configs from YAML, with dotted command-line overrides.

A config is a (nested) dataclass; its defaults live in code, a YAML file
overrides them, and ``--set key.path=value`` overrides both. Every key is
checked: an unknown key, a key given twice in a file, or a value of the wrong
type is a `ConfigError` naming the key path, where it came from (file and line,
or the override) and how to fix it.

A value is read as its field's declared type, never by YAML 1.1's guesses: a
``str`` field given ``no`` holds ``'no'`` (not ``False``), and a number that
YAML 1.1 and Python read differently (``010``: octal 8 or decimal 10? ``1:30``:
90, in base 60?) is an error that says how to write it. Numbers are read as
Python reads them (``1_000``, ``0x10``, ``1e-3``, and YAML's ``.inf``); a
``bool`` field takes ``true``/``false``, ``yes``/``no`` or ``on``/``off``
(on the command line, ``--name`` alone means true).
A field typed ``Any`` takes a plain value only where YAML 1.1 and YAML 1.2
agree on it; else quote it.

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
  >>> load(Config, overrides=["steps=010"])
  Traceback (most recent call last):
  ...
  titanax.errors.ConfigError: config key 'steps' (from --set steps=010) must be int; got '010'. YAML 1.1 reads it as octal 8, YAML 1.2 and Python as 10: write 10, or 0o10 for 8.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from titanax.errors import ConfigError
from titanax.launch.yaml_types import (
    Section,
    Source,
    build,
    check_path,
    compose,
    core,
    field_types,
    init_fields,
    read_fields,
    read_text,
    section_type,
    type_name,
)

__all__ = ["load", "from_argv", "to_dict"]

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for logging, or for saving next to a checkpoint)."""
    return dataclasses.asdict(config)


def load(
    cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> T:
    """Builds the dataclass ``cls`` from its defaults, a YAML file and ``key.path=value`` overrides.

    Args:
      cls: a dataclass, possibly with dataclass fields (sections).
      path: a YAML file (composed with PyYAML's safe loader: no code runs; values
        are read as their fields' types); ``None`` for the defaults.
      overrides: ``"optimizer.lr=1e-3"`` strings, applied in order (a later one
        wins); values are read as YAML, then as the field's type.

    Raises:
      ConfigError: an unknown key, a key given twice in the file, a value of the
        wrong type or one that YAML 1.1 would misread, a malformed override, or a
        file that is not a YAML mapping. File errors give the line.
    """
    return _load(cls, path, [(item, f"--set {item}") for item in overrides])


def _load(cls: type[T], path: Any, overrides: Sequence[tuple[str, str]]) -> T:
    """`load`, with each override as ``(key=value, what the user typed)``."""
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"config: {cls!r} is not a dataclass.")
    root = Section(cls, {})
    if path is not None:
        file = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"config: cannot read {file}: {e.strerror}.") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config: {file} is not UTF-8 text ({e.reason}).") from None
        node = compose(text, file)
        if node is not None and not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"config: {file} must hold a mapping of keys to values.")
        if node is not None:
            root = Section(cls, read_fields(node, cls, "", Source(file=file)))
    for item, typed in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"config: override {typed!r} must look like key.path=value.")
        src = Source(item=typed)
        tp = check_path(cls, parts, src.at(None))
        root.set(parts, read_text(text, tp, key.strip(), src))
    return typing.cast(T, build(root, ""))


# ------------------------------------------------------------------ the command line
def _docs(cls: Any) -> dict[str, str]:
    """Each field's help: ``metadata={"help": ...}``, else the string literal after it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and dataclasses.is_dataclass(klass)):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (defined in a doctest, or built)
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                out[a.target.id] = " ".join(b.value.value.split())
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            out[f.name] = " ".join(str(f.metadata["help"]).split())
    return out


def _metavar(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else _metavar(a) for a in args)
    if origin is typing.Literal:
        return "{" + ",".join(_show(a) for a in args) + "}"
    if origin in (list, tuple, Sequence, set, frozenset):
        return f"[{_metavar(args[0]) if args else 'VALUE'},...]"
    if origin in (dict, Mapping):
        return "MAPPING"
    names = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}
    return names.get(tp, "VALUE" if tp is Any else type_name(tp).upper())


def _show(value: Any) -> str:
    """A default as one would write it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value and core(value) == value and value.strip() == value else repr(value)
    return repr(value)


def _rows(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(--key METAVAR, help (default: ...))`` for each setting, sections flattened."""
    rows = []
    hints, docs = field_types(type(config)), _docs(type(config))
    for f in init_fields(type(config)):
        key, value = prefix + f.name, getattr(config, f.name)
        if section_type(hints[f.name]) is not None and dataclasses.is_dataclass(value):
            rows += _rows(value, key + ".")
            continue
        text = docs.get(f.name, "")
        text += f"{' ' if text else ''}(default: {_show(value)})"
        rows.append((f"--{key.replace('_', '-')} {_metavar(hints[f.name])}", text))
    return rows


def _help(cls: Any, prog: str, description: str | None, default: Any) -> str:
    """The ``--help`` text: usage, description, options, and every setting with its default."""
    defaults = load(cls, default)
    width = max(min(shutil.get_terminal_size((100, 24)).columns, 100) - 2, 60)
    path = os.fspath(default) if default is not None else None
    if path is not None and not os.path.relpath(path).startswith(".."):
        path = os.path.relpath(path)
    options = [
        ("-h, --help", "show this help and exit"),
        ("--config FILE", "a YAML file of settings" + (f" (default: {path})" if path else "")),
        ("--set KEY=VALUE", "one setting (repeatable); a KEY in a section is dotted: a.b"),
    ]

    def table(rows: list[tuple[str, str]]) -> list[str]:
        out, indent = [], " " * 24
        for name, text in rows:
            first = f"  {name}".ljust(24)
            if len(first) > 24:  # a long name: its help starts on the next line
                out.append(first)
                first = indent
            out += textwrap.wrap(
                text,
                width,
                initial_indent=first,
                subsequent_indent=indent,
                break_long_words=False,  # paths and names stay whole
                break_on_hyphens=False,
            )
        return out

    lines = [f"usage: {prog} [-h] [--config FILE] [--set KEY=VALUE]... [--KEY VALUE]..."]
    if description and description.strip():
        lines += ["", textwrap.dedent(description).strip()]
    lines += ["", "options:", *table(options)]
    lines += ["", "settings (--KEY VALUE or --set KEY=VALUE; a later one wins):"]
    lines += table(_rows(defaults))
    return "\n".join(lines)


def from_argv(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    default: str | os.PathLike[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
    exit_on_error: bool = False,
) -> T:
    """A config from command-line arguments: ``--config FILE``, ``--set key=value`` (repeatable),
    and the shorthand ``--key value`` (dashes become underscores: ``--batch-size 64``).

    ``-h``/``--help`` prints every setting with its type, its default (from
    ``default``, the file read when no ``--config`` is given) and its help text,
    then exits with code 0, as ``argparse`` does. A setting's help is the string
    literal after its field (an attribute docstring) or ``metadata={"help": ...}``.

    Args:
      cls: the config dataclass.
      argv: the arguments; ``None`` for ``sys.argv[1:]``.
      default: the YAML file read when no ``--config`` is given.
      prog: the program's name in ``--help`` and errors (default: ``sys.argv[0]``'s).
      description: text shown under the usage line of ``--help``.
      exit_on_error: instead of raising a ConfigError, print it as one line to
        stderr and exit with code 2 (as ``argparse`` does): for scripts' ``main``.

    Raises:
      ConfigError: a malformed argument, or any error of `load`.
      SystemExit: after ``--help`` (code 0), or on an error with ``exit_on_error`` (code 2).

    Examples:
      >>> import dataclasses
      >>> @dataclasses.dataclass
      ... class Config:
      ...     steps: int = 100
      ...     batch_size: int = 32
      >>> from_argv(Config, ["--steps", "5", "--set", "batch_size=8"])
      Config(steps=5, batch_size=8)
      >>> from_argv(Config, ["--help"], prog="train.py")
      Traceback (most recent call last):
      ...
      SystemExit: 0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0]) or "python"
    try:
        if "-h" in args or "--help" in args:
            print(_help(cls, prog, description, default), flush=True)
            raise SystemExit(0)
        path, overrides = _parse(args, default, _bool_fields(cls))
        return _load(cls, path, overrides)
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"{prog}: ConfigError: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _bool_fields(cls: type) -> frozenset[str]:
    """Names of the ``bool`` fields of a config dataclass: ``--name`` alone sets them true."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: no bare flags
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(cls) if hints.get(f.name) is bool)


def _parse(
    args: list[str], default: Any, flags: frozenset[str] = frozenset()
) -> tuple[Any, list[tuple[str, str]]]:
    """``(config file, overrides)`` from the arguments; an override is ``(key=value, as typed)``.

    A ``bool`` field named in ``flags`` may be given alone (``--quick``): true."""
    path, overrides = default, []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(
                f"config: unexpected argument {arg!r}; use --key value or --set key=value "
                "(--help lists the settings)."
            )
        name, eq, inline = arg[2:].partition("=")
        if eq:
            value, typed = inline, arg
        elif name.replace("-", "_") in flags and (i + 1 == len(args) or args[i + 1][:2] == "--"):
            value, typed = "true", arg
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 1
            typed = f"{arg} {value}"
        else:
            raise ConfigError(f"config: {arg} needs a value, e.g. {arg} VALUE or {arg}=VALUE.")
        if name == "config":
            path = value
        elif name == "set":
            overrides.append((value, f"--set {value}"))
        else:
            overrides.append((f"{name.replace('-', '_')}={value}", typed))
        i += 1
    return path, overrides
