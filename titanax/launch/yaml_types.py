"""YAML values read as the Python types a config dataclass declares (for `titanax.launch.config`).

PyYAML composes the file into nodes (no values built, no code run); each scalar is
then read by its field's type, not by YAML 1.1's guesses, and each error names the
key, the file and line (or the override) and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from titanax.errors import ConfigError

_STR = "tag:yaml.org,2002:str"
_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}
_RESOLVER = yaml.resolver.Resolver()
_MERGE = "tag:yaml.org,2002:merge"
_NULL = "tag:yaml.org,2002:null"
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]*[0-9][0-9_]*")  # 010: octal in YAML 1.1, 10 in 1.2
_BASE_60 = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")  # 1:30 is 90 in YAML 1.1
_YAML_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
# YAML 1.2's core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), for `Any` fields.
_CORE_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(
    r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"
)


# ------------------------------------------------------------------ types
def field_types(cls: Any) -> dict[str, Any]:
    """Field types, resolving string annotations; a section's class is found from its default."""
    local: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if isinstance(factory, type):
            local[factory.__name__] = factory
        elif f.default is not dataclasses.MISSING and f.default is not None:
            local[type(f.default).__name__] = type(f.default)
    return typing.get_type_hints(cls, localns=local)


def _options(tp: Any) -> tuple[Any, ...] | None:
    """The members of a union type, or None for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def section_type(tp: Any) -> Any:
    """The dataclass of a section typed ``C`` or ``C | None``; None for a value."""
    options = _options(tp) or (tp,)
    classes = [o for o in options if dataclasses.is_dataclass(o)]
    rest = [o for o in options if o is not type(None) and not dataclasses.is_dataclass(o)]
    return classes[0] if len(classes) == 1 and not rest else None


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def init_fields(cls: Any) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


# ------------------------------------------------------------------ reading YAML nodes
@dataclasses.dataclass(frozen=True)
class Source:
    """Where values come from: a file (errors give the line) or one override, as typed."""

    file: str | None = None
    item: str | None = None

    def at(self, node: yaml.Node | None) -> str:
        if self.file is None:
            return f" (from {self.item})"
        line = f", line {node.start_mark.line + 1}" if node is not None else ""
        return f" (in {self.file}{line})"


@dataclasses.dataclass
class Section:
    """A section's values read so far (a file, then overrides), built at the end."""

    cls: Any
    values: dict[str, Any]

    def set(self, parts: list[str], value: Any) -> None:
        """Sets the key path ``parts`` (checked already) to ``value``, opening sections on the way."""
        section = self
        for part in parts[:-1]:
            child = section.values.get(part)
            if not isinstance(child, Section):
                child = Section(section_type(field_types(section.cls)[part]), {})
                section.values[part] = child
            section = child
        section.values[parts[-1]] = value


class _NoMatch(Exception):
    """A scalar that does not read as a type; ``hint`` says how to write it, if there is more to say."""

    def __init__(self, hint: str = ""):
        self.hint = hint


def compose(text: str, what: str) -> yaml.Node | None:
    """The YAML node tree of ``text`` (no values built yet), or a one-line ConfigError."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise ConfigError(
            f"config: {what} is not valid YAML: {problem}{where}. Check the indentation, and "
            "quote a value that holds ': ' or ' #' or starts with a character YAML reserves "
            "(such as @ * & ! % `)."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config: {what} is not valid YAML: {' '.join(str(e).split())}."
        ) from None


def _plain(node: yaml.Node) -> bool:
    """A scalar written without quotes or a tag: YAML would guess its type."""
    return (
        isinstance(node, yaml.ScalarNode)
        and node.style is None
        and node.tag == _RESOLVER.resolve(yaml.ScalarNode, node.value, (True, False))
    )


def _check_tag(node: yaml.Node, key: str, src: Source) -> None:
    """Tags other than YAML's own (str, int, float, bool, null, seq, map) are errors."""
    if node.tag not in _TAGS and not _plain(node):
        raise ConfigError(
            f"config key {key!r}{src.at(node)} has the tag {node.tag!r}; values are read as "
            "their fields' types: drop the tag."
        )


def _yaml11(node: yaml.ScalarNode) -> Any:
    """What ``yaml.safe_load`` (YAML 1.1) makes of a plain scalar."""
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except yaml.YAMLError:  # '=' resolves to !!value, which the safe loader cannot build
        return node.value


def core(text: str) -> Any:
    """What YAML 1.2's core schema makes of a plain scalar."""
    if text in _NULLS:
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text.lower() == "true"
    if _CORE_INT.fullmatch(text):
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)
    if _CORE_FLOAT.fullmatch(text):
        return _YAML_FLOATS[text.lower()] if "." in text and text[-1].isalpha() else float(text)
    return text


def _same(a: Any, b: Any) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return type(a) is type(b) and (a == b or nan)


def _int(text: str) -> int:
    """An int as Python writes it (``10``, ``1_000``, ``0x10``, ``0o10``, ``0b11``)."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    digits = text.replace("_", "")
    if _LEADING_ZERO.fullmatch(text):
        decimal = int(digits, 10)
        if all(c in "+-01234567" for c in digits):
            octal = int(digits, 8)
            o = f"{'-' if octal < 0 else ''}0o{abs(octal):o}"
            raise _NoMatch(
                f"YAML 1.1 reads it as octal {octal}, YAML 1.2 and Python as {decimal}: "
                f"write {decimal}, or {o} for {octal}."
            )
        raise _NoMatch(f"a leading 0 means octal in YAML 1.1: write {decimal}.")
    if _BASE_60.fullmatch(text):
        value = yaml.safe_load(text)
        raise _NoMatch(f"YAML 1.1 reads it in base 60, as {value}: write {value}.")
    raise _NoMatch()


def _scalar(node: yaml.ScalarNode, tp: Any) -> Any:
    """A scalar as the simple type ``tp``, or _NoMatch."""
    text, plain = node.value, _plain(node)
    if tp is type(None):
        if plain and text in _NULLS:
            return None
        raise _NoMatch()
    if tp is str:
        if plain and text in _NULLS:
            raise _NoMatch(f"quote it ('{text}') for the text.")
        return text
    if tp is bool:
        if text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise _NoMatch("write true or false (yes/no and on/off also work).")
    if tp is int:
        return _int(text)
    if tp is float:
        if text.lower() in _YAML_FLOATS:
            return _YAML_FLOATS[text.lower()]
        try:
            return float(_int(text))
        except _NoMatch as e:
            if e.hint:  # 010 or 1:30, which YAML 1.1 reads otherwise
                raise
        try:
            return float(text)
        except ValueError:
            raise _NoMatch() from None
    if typing.get_origin(tp) is typing.Literal:
        for choice in typing.get_args(tp):
            try:
                if _same(_scalar(node, type(choice)), choice):
                    return choice
            except _NoMatch:
                continue
        raise _NoMatch()
    value = core(text) if plain else text  # another class: the value YAML 1.2 reads
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _NoMatch()
    return value


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return "null" if _plain(node) and node.value in _NULLS else repr(node.value)
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _wrong(key: str, node: yaml.Node, tp: Any, src: Source, hint: str = "") -> ConfigError:
    if typing.get_origin(tp) is typing.Literal:
        want = "one of " + ", ".join(map(repr, typing.get_args(tp)))
    else:
        want = type_name(tp)
    return ConfigError(
        f"config key {key!r}{src.at(node)} must be {want}; got {_shown(node)}."
        + (f" {hint[0].upper()}{hint[1:]}" if hint else "")
    )


def read(node: yaml.Node, tp: Any, key: str, src: Source) -> Any:
    """The value of ``node`` as type ``tp`` (a dataclass: a Section), or a ConfigError."""
    _check_tag(node, key, src)
    if tp is Any:
        return _any(node, key, src)
    cls = section_type(tp)
    if cls is not None and isinstance(node, yaml.MappingNode):
        return Section(cls, read_fields(node, cls, key, src))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple, Sequence, set, frozenset):
        if not isinstance(node, yaml.SequenceNode):
            raise _wrong(key, node, tp, src)
        items = node.value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _wrong(key, node, tp, src, f"it takes {len(args)} items, not {len(items)}.")
            kinds = list(args)
        else:
            kinds = [args[0] if args else Any] * len(items)
        out = [read(v, k, f"{key}[{i}]", src) for i, (v, k) in enumerate(zip(items, kinds))]
        return out if origin in (list, Sequence) else origin(out)
    if origin in (dict, Mapping):
        if not isinstance(node, yaml.MappingNode):
            raise _wrong(key, node, tp, src)
        kt, vt = args if args else (Any, Any)
        return {
            read(k, kt, key, src): read(v, vt, f"{key}.{k.value}", src)
            for k, v in _pairs(node, key, src).values()
        }
    options = _options(tp)
    if options is not None:
        return _read_union(node, tp, options, key, src)
    if not isinstance(node, yaml.ScalarNode):
        raise _wrong(key, node, tp, src)
    try:
        return _scalar(node, tp)
    except _NoMatch as e:
        raise _wrong(key, node, tp, src, e.hint) from None


def _read_union(node: yaml.Node, tp: Any, options: tuple[Any, ...], key: str, src: Source) -> Any:
    """A union member's value: null first, then the other types, text last (quoted text: first).

    A list or mapping goes to the first member that takes one, and its errors are its own.
    """
    if Any in options:
        return _any(node, key, src)
    if not isinstance(node, yaml.ScalarNode):
        takes = yaml.MappingNode if isinstance(node, yaml.MappingNode) else yaml.SequenceNode
        fits = [o for o in options if _takes(o) is takes]
        if not fits:
            raise _wrong(key, node, tp, src)
        return read(node, fits[0], key, src)
    if not _plain(node) and str in options:
        return node.value
    hint = ""
    for option in sorted(options, key=lambda o: (o is not type(None), o is str)):
        if _takes(option) is yaml.ScalarNode:
            try:
                return _scalar(node, option)
            except _NoMatch as e:
                hint = hint or e.hint
    raise _wrong(key, node, tp, src, hint)


def _takes(tp: Any) -> type[yaml.Node]:
    """The kind of YAML node a type is read from."""
    origin = typing.get_origin(tp)
    if section_type(tp) is not None or origin in (dict, Mapping):
        return yaml.MappingNode
    if origin in (list, tuple, Sequence, set, frozenset):
        return yaml.SequenceNode
    return yaml.ScalarNode


def _pairs(node: yaml.MappingNode, key: str, src: Source) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping's keys, in order, as text; a key given twice is an error. ``<<`` merges."""
    given: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for k, v in node.value:
        if k.tag == _MERGE:
            for part in v.value if isinstance(v, yaml.SequenceNode) else [v]:
                if not isinstance(part, yaml.MappingNode):
                    raise ConfigError(f"config key {key!r}{src.at(k)}: '<<' merges mappings only.")
                for name, pair in _pairs(part, key, src).items():
                    merged.setdefault(name, pair)
            continue
        if not isinstance(k, yaml.ScalarNode):
            raise ConfigError(
                f"config key {key!r}{src.at(k)} has a key that is {_shown(k)}; keys are names."
            )
        name = k.value
        if name in given:
            path = f"{key}.{name}" if key else name
            first = given[name][0].start_mark.line + 1
            raise ConfigError(
                f"config key {path!r}{src.at(k)} is given twice (first on line {first}); "
                "YAML keeps only the last. Delete one of them."
            )
        given[name] = (k, v)
    return {**merged, **given}


def read_fields(node: yaml.MappingNode, cls: Any, prefix: str, src: Source) -> dict[str, Any]:
    """A section's given fields, each read as its declared type."""
    hints = field_types(cls)
    known = [f.name for f in init_fields(cls)]
    out = {}
    for name, (k, v) in _pairs(node, prefix, src).items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in known:
            raise _unknown(key, prefix, known, src.at(k))
        out[name] = read(v, hints[name], key, src)
    return out


def _any(node: yaml.Node, key: str, src: Source) -> Any:
    """A value of no declared type: plain scalars only where YAML 1.1 and 1.2 agree."""
    _check_tag(node, key, src)
    if isinstance(node, yaml.SequenceNode):
        return [_any(v, f"{key}[{i}]", src) for i, v in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        return {
            k.value: _any(v, f"{key}.{k.value}", src) for k, v in _pairs(node, key, src).values()
        }
    assert isinstance(node, yaml.ScalarNode)
    if not _plain(node):
        return node.value
    old, new = _yaml11(node), core(node.value)
    if _same(old, new):
        return new
    number = next((v for v in (new, old) if not isinstance(v, str) and _literal(v)), None)
    fix = f", or write {_literal(number)}" if number is not None else ""
    raise ConfigError(
        f"config key {key!r}{src.at(node)} is {node.value!r}, which YAML 1.1 reads as {old!r} and "
        f"YAML 1.2 as {new!r}. Quote it ('{node.value}') for the text{fix}."
    )


def _literal(value: Any) -> str:
    """``value`` as YAML 1.1 and 1.2 both read it ('' where there is no such spelling)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value) if "." in repr(value) else ""
    return ""


def _unknown(key: str, prefix: str, known: list[str], where: str) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    owner = f"the keys of {prefix!r} are" if prefix else "the top-level keys are"
    return ConfigError(f"config key {key!r}{where} is unknown; {owner} {', '.join(known)}.{hint}")


def check_path(cls: Any, parts: list[str], where: str) -> Any:
    """Checks that ``parts`` names a field; returns its type."""
    node: Any = cls
    prefix = ""
    for part in parts:
        section = section_type(node)
        if section is None:
            raise ConfigError(f"config key {prefix!r}{where} is not a section; it has no {part!r}.")
        known = [f.name for f in init_fields(section)]
        key = f"{prefix}.{part}" if prefix else part
        if part not in known:
            raise _unknown(key, prefix, known, where)
        node, prefix = field_types(section)[part], key
    return node


def build(section: Section, prefix: str) -> Any:
    """The dataclass of ``section``; fields not given take their defaults."""
    kwargs = {
        k: build(v, f"{prefix}.{k}" if prefix else k) if isinstance(v, Section) else v
        for k, v in section.values.items()
    }
    missing = [
        f.name
        for f in init_fields(section.cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(repr(f"{prefix}.{m}" if prefix else m) for m in missing)
        raise ConfigError(
            f"config key {keys} has no default and was not given; set it in the file or with "
            f"--set {(prefix + '.' if prefix else '') + missing[0]}=VALUE."
        )
    return section.cls(**kwargs)


def read_text(text: str, tp: Any, key: str, src: Source) -> Any:
    """An override's value: ``text`` read as YAML, then as ``tp``.

    An empty text is the empty string (``--out=`` is ``''``), a comment alone is null.
    """
    if not text:
        return read(yaml.ScalarNode(_STR, "", style="'"), tp, key, src)
    node = compose(text, src.item or text)
    return read(node if node is not None else yaml.ScalarNode(_NULL, ""), tp, key, src)
