"""Schema registries: the embedded file registry and a Confluent Schema Registry.

The **file registry** is the default and needs nothing running: ``registry.json`` beside the
``.avsc`` files lists every published version of the subject with its fixed schema id, which
the codec writes into the Confluent framing. :meth:`FileRegistry.check` proves that every
version is compatible with every earlier one (FULL_TRANSITIVE); ``auditpipe schemas check`` and
the test suite run it, so an incompatible version cannot land.

A **Confluent Schema Registry** is reached through confluent-kafka's client (the ``registry``
extra). :class:`ConfluentRegistry` registers schemas (after checking them with our own checker
against every version already registered under the subject), fetches a schema by id, and checks
compatibility. Our framing carries the ids of ``registry.json``, so a Confluent registry that
serves our topics must hand out the same ids: :meth:`ConfluentRegistry.sync` registers the file
versions in order and fails, naming both ids, when the registry assigned different ones (then
import them with the registry's IMPORT mode, or use a registry of their own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro

from auditpipe.errors import AuditpipeError

from . import compat
from .compat import Incompatibility, Mode, SchemaError
from .manifest import package_dir, read_manifest


class RegistryError(AuditpipeError):
    """The registry refused or failed an operation (the message says which and why)."""


class IncompatibleSchemaError(RegistryError):
    """A schema that would break readers or writers of the versions already registered."""

    def __init__(self, subject: str, mode: Mode, problems: list[Incompatibility]) -> None:
        lines = "\n".join(f"  {p} (reader {p.reader}, writer {p.writer})" for p in problems)
        super().__init__(f"schema is not {mode} compatible with subject {subject!r}:\n{lines}")
        self.problems = problems


@dataclass(frozen=True)
class Version:
    version: int
    id: int
    file: str
    schema: compat.Schema


class FileRegistry:
    """``registry.json`` and its ``.avsc`` files in ``directory`` (default: this package).

    Construction reads and validates everything; :class:`SchemaError` names the file and key.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else package_dir()
        manifest = read_manifest(self.directory)
        self.subject = manifest.subject
        versions: list[Version] = []
        for entry in manifest.entries:
            schema = compat.load(manifest.path_of(entry))
            try:  # the codec reads with fastavro: a schema it refuses cannot be published
                fastavro.parse_schema(schema.json, _write_hint=False)
            except Exception as exc:
                raise SchemaError(f"{schema.source}: {type(exc).__name__}: {exc}") from None
            versions.append(Version(entry.version, entry.id, entry.file, schema))
        self.versions = sorted(versions, key=lambda v: v.version)

    def by_id(self, schema_id: int) -> Version:
        for v in self.versions:
            if v.id == schema_id:
                return v
        raise KeyError(schema_id)

    @property
    def latest(self) -> Version:
        return self.versions[-1]

    def check(self, mode: Mode | str = Mode.FULL_TRANSITIVE) -> list[Incompatibility]:
        """Every problem between a version and the earlier ones under ``mode``."""
        problems: list[Incompatibility] = []
        for i, v in enumerate(self.versions):
            problems.extend(compat.check(v.schema, [p.schema for p in self.versions[:i]], mode))
        return problems


def _schema_json(schema: compat.Schema | dict[str, Any] | str) -> tuple[compat.Schema, str]:
    if isinstance(schema, compat.Schema):
        parsed = schema
    elif isinstance(schema, str):
        try:
            parsed = compat.parse(json.loads(schema), "schema")
        except json.JSONDecodeError as exc:
            raise SchemaError(f"schema: not JSON: {exc}") from None
    else:
        parsed = compat.parse(schema, "schema")
    return parsed, json.dumps(parsed.json, separators=(",", ":"))


class ConfluentRegistry:
    """One subject of a Confluent Schema Registry, through confluent-kafka's client.

    ``client`` is a ``confluent_kafka.schema_registry.SchemaRegistryClient`` (or its mock, which
    ``url="mock://..."`` gives). Errors of the client are raised as :class:`RegistryError`.
    """

    def __init__(self, client: Any, subject: str = "auditpipe.AuditEvent") -> None:
        self.client = client
        self.subject = subject

    @classmethod
    def from_url(
        cls, url: str, subject: str = "auditpipe.AuditEvent", **conf: Any
    ) -> ConfluentRegistry:
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as exc:
            raise RegistryError(
                f"a Confluent Schema Registry needs confluent-kafka ({exc}): "
                "pip install 'auditpipe[registry]'"
            ) from None
        return cls(SchemaRegistryClient.new_client({"url": url, **conf}), subject)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise RegistryError(f"schema registry: {what} failed: {exc}") from exc

    def registered(self) -> list[tuple[int, compat.Schema]]:
        """``(version, schema)`` of every version under the subject, oldest first."""
        versions = sorted(self._call("list versions", self.client.get_versions, self.subject))
        out = []
        for number in versions:
            rs = self._call(f"get version {number}", self.client.get_version, self.subject, number)
            text = rs.schema.schema_str
            out.append((number, compat.parse(json.loads(text), f"{self.subject} v{number}")))
        return out

    def check_compatibility(
        self, schema: compat.Schema | dict[str, Any] | str, mode: Mode | str = Mode.FULL_TRANSITIVE
    ) -> list[Incompatibility]:
        """Problems ``schema`` would have as the next version of the subject under ``mode``."""
        parsed, _ = _schema_json(schema)
        return compat.check(parsed, [s for _, s in self.registered()], mode)

    def server_compatible(self, schema: compat.Schema | dict[str, Any] | str) -> bool:
        """Ask the registry itself (its configured compatibility level, latest version)."""
        from confluent_kafka.schema_registry import Schema

        _, text = _schema_json(schema)
        return bool(
            self._call(
                "test compatibility",
                self.client.test_compatibility,
                self.subject,
                Schema(text, "AVRO"),
            )
        )

    def register(
        self, schema: compat.Schema | dict[str, Any] | str, mode: Mode | str = Mode.FULL_TRANSITIVE
    ) -> int:
        """Check ``schema`` under ``mode`` against the subject, then register it; its id."""
        from confluent_kafka.schema_registry import Schema

        parsed, text = _schema_json(schema)
        problems = compat.check(parsed, [s for _, s in self.registered()], mode)
        if problems:
            raise IncompatibleSchemaError(self.subject, Mode(str(mode).upper()), problems)
        sid = self._call(
            "register", self.client.register_schema, self.subject, Schema(text, "AVRO")
        )
        return int(sid)

    def fetch(self, schema_id: int) -> compat.Schema:
        """The schema registered under ``schema_id``."""
        schema = self._call(f"get schema id {schema_id}", self.client.get_schema, schema_id)
        return compat.parse(json.loads(schema.schema_str), f"schema id {schema_id}")

    def sync(
        self, files: FileRegistry | None = None, mode: Mode | str = Mode.FULL_TRANSITIVE
    ) -> dict[int, int]:
        """Register every file version in order; ``{file id: registry id}``, all equal.

        Raises :class:`RegistryError` when the registry assigned an id that differs from
        ``registry.json``: the codec's framing would then name the wrong schema.
        """
        files = files or FileRegistry()
        ids: dict[int, int] = {}
        for v in files.versions:
            sid = self.register(v.schema, mode)
            if sid != v.id:
                raise RegistryError(
                    f"schema registry gave {v.file} (version {v.version}) id {sid}, but "
                    f"registry.json fixes id {v.id}: import the versions with their ids "
                    "(the registry's IMPORT mode) or use a registry of auditpipe's own"
                )
            ids[v.id] = sid
        return ids
