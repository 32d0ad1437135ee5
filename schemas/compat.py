"""Avro schema compatibility: the specification's resolution rules and Confluent's modes.

:func:`reader_incompatibilities` answers one question: can data written with ``writer`` be
read with ``reader``? It follows the "Schema Resolution" section of the Avro specification:

- primitives match when equal, or when the writer's type is promoted: int to long, float or
  double; long to float or double; float to double; string to bytes and bytes to string;
- records, enums and fixed match by unqualified name, or by one of the reader's aliases;
  fixed also needs equal sizes;
- records: fields are matched by name, or by one of the reader field's aliases; a writer field
  the reader lacks is skipped; a reader field the writer lacks needs a default;
- enums: every writer symbol must be a reader symbol, unless the reader enum has a default;
- arrays and maps resolve their items and values;
- unions: each branch the writer may select must resolve against the reader (the reader's
  union when it has one: its first matching branch, an exact name or type match preferred);
- logical types are resolved on their underlying type, except that two valid ``decimal``
  types must agree on precision and scale; an invalid logical type is ignored, as the
  specification says;
- named types may be recursive: a (writer, reader) pair already being resolved is assumed
  to resolve (the check is coinductive), so recursion terminates.

:func:`check` applies Confluent Schema Registry's compatibility modes to a new schema and the
previously registered versions (oldest first): BACKWARD (the new schema reads data written with
the last version), FORWARD (the last version reads data written with the new one), FULL (both),
their ``_TRANSITIVE`` forms (against every previous version, not just the last) and NONE.

Each problem is an :class:`Incompatibility` whose ``path`` walks the reader's schema from the
root record name through field names (``[]`` for array items, ``{}`` for map values), e.g.
``AuditEvent.usage.total_tokens: type long cannot be read as int``.

:func:`parse` turns schema JSON into the node tree used here and raises :class:`SchemaError`
with the reason when the schema is not valid Avro (unknown or duplicate names, bad defaults,
nested unions, ...).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from auditpipe.errors import AuditpipeError

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SchemaError(AuditpipeError):
    """A schema that is not valid Avro, or a schema file that cannot be read."""


class Mode(StrEnum):
    """Confluent Schema Registry compatibility types."""

    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def backward(self) -> bool:
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def forward(self) -> bool:
        return self.value.startswith(("FORWARD", "FULL"))


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
    root = parser.node(value, "", _root_path(value))
    for path, fld in parser.defaults:
        problem = _default_problem(fld.type, fld.default)
        if problem:
            raise SchemaError(f"{source}: {path}: invalid default {fld.default!r}: {problem}")
    return Schema(root, source, value)


def _root_path(value: Any) -> str:
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
            key = branch.fullname if isinstance(branch, (Record, Enum, Fixed)) else _kind(branch)
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
        return f"matches no branch of {_describe(node)}"
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


# ---------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class Incompatibility:
    """One reason why ``reader`` cannot read data written with ``writer``."""

    path: str
    message: str
    reader: str = ""
    writer: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _kind(node: Node) -> str:
    if isinstance(node, Primitive):
        return node.type
    return type(node).__name__.lower()


def _describe(node: Node) -> str:
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
        return f"{_kind(node)} {node.fullname}"
    if isinstance(node, Union):
        return "union [" + ", ".join(_describe(b) for b in node.branches) + "]"
    return _kind(node)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _names_match(writer: Named, reader: Named) -> bool:
    if _short(writer.fullname) == _short(reader.fullname):
        return True
    return writer.fullname in reader.aliases or _short(writer.fullname) in {
        _short(a) for a in reader.aliases
    }


def _mismatch(writer: Node, reader: Node) -> str | None:
    """Why ``writer`` does not *match* ``reader`` (the specification's shallow test), or None."""
    if isinstance(writer, Union) or isinstance(reader, Union):
        return None
    if isinstance(writer, Primitive) and isinstance(reader, Primitive):
        if writer.type == reader.type or reader.type in PROMOTIONS.get(writer.type, ()):
            if writer.logical and reader.logical and writer.logical != reader.logical:
                return f"type {_describe(writer)} cannot be read as {_describe(reader)}"
            return None
        return f"type {writer.type} cannot be read as {reader.type}"
    if type(writer) is not type(reader):
        return f"type {_describe(writer)} cannot be read as {_describe(reader)}"
    if isinstance(writer, (Record, Enum, Fixed)):
        assert isinstance(reader, (Record, Enum, Fixed))
        if not _names_match(writer, reader):
            return (
                f"{_kind(writer)} name {writer.fullname} does not match {reader.fullname} "
                "nor any of its aliases"
            )
        if isinstance(writer, Fixed) and isinstance(reader, Fixed):
            if writer.size != reader.size:
                return f"fixed size {writer.size} cannot be read as size {reader.size}"
            if writer.logical and reader.logical and writer.logical != reader.logical:
                return f"type {_describe(writer)} cannot be read as {_describe(reader)}"
    return None


def _pick(branches: Sequence[Node], writer: Node) -> Node | None:
    """The reader union branch that reads ``writer``: an exact match, else the first match."""
    matching = [b for b in branches if _mismatch(writer, b) is None]
    for b in matching:
        if isinstance(writer, (Record, Enum, Fixed)):
            if isinstance(b, (Record, Enum, Fixed)) and b.fullname == writer.fullname:
                return b
        elif _kind(b) == _kind(writer):
            return b
    return matching[0] if matching else None


class _Resolver:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []
        self.active: set[tuple[int, int]] = set()

    def add(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def resolve(self, writer: Node, reader: Node, path: str) -> None:
        if isinstance(writer, Union):
            for branch in writer.branches:
                if isinstance(reader, Union):
                    target = _pick(reader.branches, branch)
                    if target is None:
                        self.add(
                            path, f"type {_describe(branch)} cannot be read as {_describe(reader)}"
                        )
                        continue
                else:
                    reason = _mismatch(branch, reader)
                    if reason is not None:
                        self.add(path, reason)
                        continue
                    target = reader
                self.resolve(branch, target, path)
            return
        if isinstance(reader, Union):
            target = _pick(reader.branches, writer)
            if target is None:
                self.add(path, f"type {_describe(writer)} cannot be read as {_describe(reader)}")
            else:
                self.resolve(writer, target, path)
            return
        reason = _mismatch(writer, reader)
        if reason is not None:
            self.add(path, reason)
            return
        if isinstance(writer, Array) and isinstance(reader, Array):
            self.resolve(writer.items, reader.items, f"{path}[]")
        elif isinstance(writer, Map) and isinstance(reader, Map):
            self.resolve(writer.values, reader.values, f"{path}{{}}")
        elif isinstance(writer, Enum) and isinstance(reader, Enum):
            missing = [s for s in writer.symbols if s not in reader.symbols]
            if missing and reader.default is None:
                self.add(
                    path,
                    f"writer symbol(s) {', '.join(missing)} not in reader enum "
                    f"{reader.fullname}, which has no default",
                )
        elif isinstance(writer, Record) and isinstance(reader, Record):
            key = (id(writer), id(reader))
            if key in self.active:  # recursion: assume it resolves (coinductive)
                return
            self.active.add(key)
            try:
                self.record(writer, reader, path)
            finally:
                self.active.discard(key)

    def record(self, writer: Record, reader: Record, path: str) -> None:
        by_name = {f.name: f for f in writer.fields}
        for rf in reader.fields:
            wf = by_name.get(rf.name)
            if wf is None:
                wf = next((by_name[a] for a in rf.aliases if a in by_name), None)
            fpath = f"{path}.{rf.name}"
            if wf is not None:
                self.resolve(wf.type, rf.type, fpath)
            elif not rf.has_default:
                self.add(
                    fpath,
                    "reader field has no default and the writer has no field of that name"
                    + (f" or alias ({', '.join(rf.aliases)})" if rf.aliases else ""),
                )


def reader_incompatibilities(reader: Schema, writer: Schema) -> list[Incompatibility]:
    """Every reason why data written with ``writer`` cannot be read with ``reader``."""
    resolver = _Resolver()
    resolver.resolve(writer.root, reader.root, _root_path(reader.json))
    return [Incompatibility(p, m, reader.source, writer.source) for p, m in resolver.problems]


def can_read(reader: Schema, writer: Schema) -> bool:
    return not reader_incompatibilities(reader, writer)


def check(new: Schema, previous: Sequence[Schema], mode: Mode | str) -> list[Incompatibility]:
    """Problems that stop ``new`` from following ``previous`` (oldest first) under ``mode``."""
    mode = Mode(str(mode).upper())
    if mode is Mode.NONE or not previous:
        return []
    olds = list(previous) if mode.transitive else [previous[-1]]
    problems: list[Incompatibility] = []
    for old in olds:
        if mode.backward:
            problems.extend(reader_incompatibilities(reader=new, writer=old))
        if mode.forward:
            problems.extend(reader_incompatibilities(reader=old, writer=new))
    return problems
