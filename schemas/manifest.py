"""The schema manifest (``registry.json``): the one place that reads it, and the schemas it names.

``registry.json`` lists every published version of the AuditEvent subject with its fixed schema
id (the id the codec writes into the Confluent framing) and its ``.avsc`` file. The codec, the
fast encoder and :class:`auditpipe.schemas.registry.FileRegistry` all read it through
:func:`read_manifest`; the package's own manifest is read once and cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, cast

import fastavro

from .avsc import SchemaError

MANIFEST = "registry.json"


@dataclass(frozen=True)
class Entry:
    """One published version: its number, its fixed schema id and its ``.avsc`` file name."""

    version: int
    id: int
    file: str


@dataclass(frozen=True)
class Manifest:
    directory: Path
    subject: str
    entries: tuple[Entry, ...]  # in the file's order

    def path_of(self, entry: Entry) -> Path:
        return self.directory / entry.file


def package_dir() -> Path:
    """The directory of this package (``registry.json`` and the ``.avsc`` files)."""
    return Path(str(resources.files(__package__)))


def read_manifest(directory: str | Path | None = None) -> Manifest:
    """``registry.json`` in ``directory`` (default: this package), validated.

    Raises :class:`SchemaError` naming the file and the entry when it cannot be used.
    """
    base = Path(directory) if directory is not None else package_dir()
    path = base / MANIFEST
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
        raise SchemaError(f'{path}: needs a "versions" list')
    entries: list[Entry] = []
    for i, item in enumerate(data["versions"]):
        where = f"{path}: versions[{i}]"
        if not isinstance(item, dict):
            raise SchemaError(f"{where}: must be an object")
        for key in ("version", "id", "file"):
            if key not in item:
                raise SchemaError(f"{where}: missing {key!r}")
        number, sid = item["version"], item["id"]
        if not isinstance(number, int) or not isinstance(sid, int) or sid < 1:
            raise SchemaError(f"{where}: version and id must be positive integers")
        if any(e.id == sid for e in entries):
            raise SchemaError(f"{where}: id {sid} is used twice")
        if any(e.version == number for e in entries):
            raise SchemaError(f"{where}: version {number} is listed twice")
        entries.append(Entry(number, sid, str(item["file"])))
    if not entries:
        raise SchemaError(f"{path}: no versions")
    return Manifest(base, str(data.get("subject", "auditpipe.AuditEvent")), tuple(entries))


@cache
def package_manifest() -> Manifest:
    """This package's manifest, read once."""
    return read_manifest()


@cache
def schema_by_id(schema_id: int) -> dict[str, Any]:
    """The parsed schema registered under ``schema_id`` (parsed once, then cached)."""
    manifest = package_manifest()
    for entry in manifest.entries:
        if entry.id == schema_id:
            text = manifest.path_of(entry).read_text("utf-8")
            return cast(dict[str, Any], fastavro.parse_schema(json.loads(text)))
    raise KeyError(schema_id)


@cache
def latest_schema_id() -> int:
    """The id of the highest version: what the codec writes unless told otherwise."""
    return max(package_manifest().entries, key=lambda e: e.version).id


def known_schema_ids() -> list[int]:
    return [e.id for e in package_manifest().entries]
