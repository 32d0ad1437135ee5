"""Avro schema JSON parsed into a small node tree, with the validity rules of the specification.

:func:`parse` (decoded JSON) and :func:`load` (a ``.avsc`` file) raise :class:`SchemaError` with
the reason when a schema is not valid Avro: unknown or duplicate names, invalid names, defaults
that do not fit their type, nested unions or a type twice in one union, enums whose default is
not a symbol, fixed without a size. Named types are shared nodes, so recursive types are
cycles in the tree. Logical types are kept only where resolution needs them: a valid
``decimal`` carries its precision and scale; every other logical type is its underlying type.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auditpipe.errors import AuditpipeError

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SchemaError(AuditpipeError):
    """A schema that is not valid Avro, or a schema file that cannot be read."""


# ---------------------------------------------------------------------------------------------
# Schema nodes


@dataclass(eq=False)
class Primitive:
    type: str
    logical: dict[str, Any] | None = None  # a valid decimal's {precision, scale}; else None


@dataclass(eq=False)
class Field:
    name: str
    type: Node
    aliases: tuple[str, ...] = ()
    has_default: bool = False
    default: Any = None


@dataclass(eq=False)
class Record:
    fullname: str
    aliases: tuple[str, ...] = ()
    fields: list[Field] = field(default_factory=list)


@dataclass(eq=False)
class Enum:
    fullname: str
    symbols: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    default: str | None = None


@dataclass(eq=False)
class Fixed:
    fullname: str
    size: int
    aliases: tuple[str, ...] = ()
    logical: dict[str, Any] | None = None


@dataclass(eq=False)
class Array:
    items: Node


@dataclass(eq=False)
class Map:
    values: Node


@dataclass(eq=False)
class Union:
    branches: list[Node]


Node = Primitive | Record | Enum | Fixed | Array | Map | Union
Named = Record | Enum | Fixed


@dataclass(frozen=True)
class Schema:
    """A parsed, valid schema. ``source`` names it in messages (a file name, ``v2``, ...)."""

    root: Node
    source: str
    json: Any


# ---------------------------------------------------------------------------------------------
# Parsing and validation


def load(path: str | Path) -> Schema:
    """Read and parse a ``.avsc`` file. Raises :class:`SchemaError` naming the file."""
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{p}: cannot read: {exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{p}: not JSON: {exc}") from None
    return parse(value, str(p))


def parse(value: Any, source: str = "schema") -> Schema:
    """Parse schema JSON (already decoded). Raises :class:`SchemaError` saying what is wrong."""
    parser = _Parser(source)
    root = parser.node(value, "", root_path(value))
    for path, fld in parser.defaults:
        problem = _default_problem(fld.type, fld.default)
        if problem:
            raise SchemaError(f"{source}: {path}: invalid default {fld.default!r}: {problem}")
    return Schema(root, source, value)


def root_path(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return str(value["name"]).rsplit(".", 1)[-1]
    if isinstance(value, dict):
        return str(value.get("type", "schema"))
    return "schema"


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.names: dict[str, Named] = {}
        self.defaults: list[tuple[str, Field]] = []

    def fail(self, path: str, message: str) -> SchemaError:
        return SchemaError(f"{self.source}: {path}: {message}")

    def node(self, value: Any, namespace: str, path: str) -> Node:
        if isinstance(value, str):
            return self.reference(value, namespace, path)
        if isinstance(value, list):
            return self.union(value, namespace, path)
        if not isinstance(value, dict):
            raise self.fail(path, f"a schema is a string, object or array, not {value!r}")
        kind = value.get("type")
        if isinstance(kind, (dict, list)):
            return self.node(kind, namespace, path)
        if not isinstance(kind, str):
            raise self.fail(path, f'"type" must be a string, got {kind!r}')
        if kind in PRIMITIVES:
            return Primitive(kind, _decimal(value, kind, None))
        if kind == "record" or kind == "error":
            return self.record(value, namespace, path)
        if kind == "enum":
            return self.enum(value, namespace, path)
        if kind == "fixed":
            return self.fixed(value, namespace, path)
        if kind == "array":
            if "items" not in value:
                raise self.fail(path, 'array without "items"')
            return Array(self.node(value["items"], namespace, f"{path}[]"))
        if kind == "map":
            if "values" not in value:
                raise self.fail(path, 'map without "values"')
            return Map(self.node(value["values"], namespace, f"{path}{{}}"))
        return self.reference(kind, namespace, path)

    def reference(self, name: str, namespace: str, path: str) -> Node:
        if name in PRIMITIVES:
            return Primitive(name)
        candidates = [name] if "." in name else [f"{namespace}.{name}" if namespace else name, name]
        for candidate in candidates:
            if candidate in self.names:
                return self.names[candidate]
        raise self.fail(path, f"unknown type {name!r} (a named type must be defined before use)")

    def union(self, value: list[Any], namespace: str, path: str) -> Union:
        branches: list[Node] = []
        seen: set[str] = set()
        for item in value:
            branch = self.node(item, namespace, path)
            if isinstance(branch, Union):
                raise self.fail(path, "a union may not immediately contain another union")
            key = branch.fullname if isinstance(branch, (Record, Enum, Fixed)) else kind(branch)
            if key in seen:
                raise self.fail(path, f"union contains {key} twice")
            seen.add(key)
            branches.append(branch)
        return Union(branches)

    def define(
        self, value: dict[str, Any], namespace: str, path: str
    ) -> tuple[str, str, tuple[str, ...]]:
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(path, f'{value.get("type")} without a "name"')
        if "." in name:
            fullname = name
        else:
            ns = value.get("namespace", namespace)
            if ns is not None and not isinstance(ns, str):
                raise self.fail(path, f"namespace must be a string, got {ns!r}")
            fullname = f"{ns}.{name}" if ns else name
        for part in fullname.split("."):
            if not _NAME.match(part):
                raise self.fail(path, f"invalid name {fullname!r}")
        if fullname in PRIMITIVES:
            raise self.fail(path, f"{fullname!r} is a primitive type name")
        if fullname in self.names:
            raise self.fail(path, f"{fullname!r} is defined twice")
        own_ns = fullname.rpartition(".")[0]
        aliases = value.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise self.fail(path, "aliases must be a list of strings")
        full_aliases = tuple(a if "." in a or not own_ns else f"{own_ns}.{a}" for a in aliases)
        return fullname, own_ns, full_aliases

    def record(self, value: dict[str, Any], namespace: str, path: str) -> Record:
        fullname, own_ns, aliases = self.define(value, namespace, path)
        record = Record(fullname, aliases)
        self.names[fullname] = record  # before the fields: they may refer to it (recursion)
        fields = value.get("fields")
        if not isinstance(fields, list):
            raise self.fail(path, f'record {fullname} needs a "fields" list')
        names: set[str] = set()
        for raw in fields:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise self.fail(path, f"record {fullname}: a field needs a name: {raw!r}")
            fname = raw["name"]
            fpath = f"{path}.{fname}"
            if not _NAME.match(fname):
                raise self.fail(fpath, f"invalid field name {fname!r}")
            if fname in names:
                raise self.fail(fpath, f"field {fname!r} is defined twice")
            names.add(fname)
            if "type" not in raw:
                raise self.fail(fpath, 'field without a "type"')
            faliases = raw.get("aliases", [])
            if not isinstance(faliases, list) or not all(isinstance(a, str) for a in faliases):
                raise self.fail(fpath, "aliases must be a list of strings")
            fld = Field(
                fname,
                self.node(raw["type"], own_ns, fpath),
                tuple(faliases),
                "default" in raw,
                raw.get("default"),
            )
            if fld.has_default:
                self.defaults.append((fpath, fld))
            record.fields.append(fld)
        return record

    def enum(self, value: dict[str, Any], namespace: str, path: str) -> Enum:
        fullname, _, aliases = self.define(value, namespace, path)
        symbols = value.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise self.fail(path, f'enum {fullname} needs a "symbols" list of strings')
        for s in symbols:
            if not _NAME.match(s):
                raise self.fail(path, f"enum {fullname}: invalid symbol {s!r}")
        if len(set(symbols)) != len(symbols):
            raise self.fail(path, f"enum {fullname}: duplicate symbols")
        default = value.get("default")
        if default is not None and default not in symbols:
            raise self.fail(path, f"enum {fullname}: default {default!r} is not a symbol")
        node = Enum(fullname, tuple(symbols), aliases, default)
        self.names[fullname] = node
        return node

    def fixed(self, value: dict[str, Any], namespace: str, path: str) -> Fixed:
        fullname, _, aliases = self.define(value, namespace, path)
        size = value.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise self.fail(path, f"fixed {fullname}: size must be a non-negative integer")
        node = Fixed(fullname, size, aliases, _decimal(value, "fixed", size))
        self.names[fullname] = node
        return node


def _decimal(value: dict[str, Any], kind: str, size: int | None) -> dict[str, Any] | None:
    """``{precision, scale}`` of a valid decimal logical type, else None (ignored, per spec)."""
    if value.get("logicalType") != "decimal" or kind not in ("bytes", "fixed"):
        return None
    precision, scale = value.get("precision"), value.get("scale", 0)
    if not isinstance(precision, int) or not isinstance(scale, int) or precision <= 0:
        return None
    if not 0 <= scale <= precision:
        return None
    if size is not None and precision > math.floor(math.log10(2 ** (8 * size - 1) - 1)):
        return None
    return {"precision": precision, "scale": scale}


def _default_problem(node: Node, value: Any) -> str | None:
    """Why ``value`` is not a valid JSON default for ``node``, or None when it is."""
    if isinstance(node, Union):
        if any(_default_problem(b, value) is None for b in node.branches):
            return None
        return f"matches no branch of {describe(node)}"
    if isinstance(node, Primitive):
        integer = isinstance(value, int) and not isinstance(value, bool)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {
            "null": value is None,
            "boolean": isinstance(value, bool),
            "int": integer and -(2**31) <= value < 2**31,
            "long": integer and -(2**63) <= value < 2**63,
            "float": number,
            "double": number,
            "bytes": isinstance(value, str),
            "string": isinstance(value, str),
        }[node.type]
        return None if ok else f"not a {node.type}"
    if isinstance(node, Enum):
        return None if value in node.symbols else f"not a symbol of enum {node.fullname}"
    if isinstance(node, Fixed):
        ok = isinstance(value, str) and len(value) == node.size
        return None if ok else f"not a string of {node.size} characters"
    if isinstance(node, Array):
        if not isinstance(value, list):
            return "not an array"
        return next(filter(None, (_default_problem(node.items, v) for v in value)), None)
    if isinstance(node, Map):
        if not isinstance(value, dict):
            return "not an object"
        return next(filter(None, (_default_problem(node.values, v) for v in value.values())), None)
    if not isinstance(value, dict):
        return f"not an object for record {node.fullname}"
    for fld in node.fields:
        if fld.name in value:
            problem = _default_problem(fld.type, value[fld.name])
            if problem:
                return f"field {fld.name}: {problem}"
        elif not fld.has_default:
            return f"field {fld.name} is missing and has no default"
    return None


def kind(node: Node) -> str:
    if isinstance(node, Primitive):
        return node.type
    return type(node).__name__.lower()


def describe(node: Node) -> str:
    if isinstance(node, Primitive):
        if node.logical:
            return f"{node.type} (decimal({node.logical['precision']},{node.logical['scale']}))"
        return node.type
    if isinstance(node, Fixed):
        if node.logical:
            dec = f"decimal({node.logical['precision']},{node.logical['scale']})"
            return f"fixed {node.fullname}({node.size}) ({dec})"
        return f"fixed {node.fullname}({node.size})"
    if isinstance(node, (Record, Enum)):
        return f"{kind(node)} {node.fullname}"
    if isinstance(node, Union):
        return "union [" + ", ".join(describe(b) for b in node.branches) + "]"
    return kind(node)
