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

Schemas are parsed by :mod:`auditpipe.schemas.avsc` (:func:`parse`, :func:`load`, re-exported
here), which raises :class:`SchemaError` for a schema that is not valid Avro.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from .avsc import (
    Array,
    Enum,
    Fixed,
    Map,
    Named,
    Node,
    Primitive,
    Record,
    Schema,
    SchemaError,
    Union,
    describe,
    kind,
    load,
    parse,
    root_path,
)

__all__ = [
    "Incompatibility",
    "Mode",
    "Schema",
    "SchemaError",
    "can_read",
    "check",
    "load",
    "parse",
    "reader_incompatibilities",
]

PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


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
                return f"type {describe(writer)} cannot be read as {describe(reader)}"
            return None
        return f"type {writer.type} cannot be read as {reader.type}"
    if type(writer) is not type(reader):
        return f"type {describe(writer)} cannot be read as {describe(reader)}"
    if isinstance(writer, (Record, Enum, Fixed)):
        assert isinstance(reader, (Record, Enum, Fixed))
        if not _names_match(writer, reader):
            return (
                f"{kind(writer)} name {writer.fullname} does not match {reader.fullname} "
                "nor any of its aliases"
            )
        if isinstance(writer, Fixed) and isinstance(reader, Fixed):
            if writer.size != reader.size:
                return f"fixed size {writer.size} cannot be read as size {reader.size}"
            if writer.logical and reader.logical and writer.logical != reader.logical:
                return f"type {describe(writer)} cannot be read as {describe(reader)}"
    return None


def _pick(branches: Sequence[Node], writer: Node) -> Node | None:
    """The reader union branch that reads ``writer``: an exact match, else the first match."""
    matching = [b for b in branches if _mismatch(writer, b) is None]
    for b in matching:
        if isinstance(writer, (Record, Enum, Fixed)):
            if isinstance(b, (Record, Enum, Fixed)) and b.fullname == writer.fullname:
                return b
        elif kind(b) == kind(writer):
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
                            path, f"type {describe(branch)} cannot be read as {describe(reader)}"
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
                self.add(path, f"type {describe(writer)} cannot be read as {describe(reader)}")
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
    resolver.resolve(writer.root, reader.root, root_path(reader.json))
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
