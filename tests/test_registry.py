"""The file registry and a Confluent Schema Registry (confluent-kafka's mock client)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from auditpipe.schemas import known_schema_ids, latest_schema_id, schema_by_id
from auditpipe.schemas.registry import (
    ConfluentRegistry,
    FileRegistry,
    IncompatibleSchemaError,
    RegistryError,
)
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

SUBJECT = "auditpipe.AuditEvent"
PUBLISHED = [v.version for v in FileRegistry().versions]  # 1 .. latest
IDS = {v.version: v.id for v in FileRegistry().versions}
NEXT = PUBLISHED[-1] + 1


def mock_registry(name: str) -> ConfluentRegistry:
    client = SchemaRegistryClient.new_client({"url": f"mock://{name}"})
    assert type(client).__name__ == "MockSchemaRegistryClient"
    return ConfluentRegistry(client, SUBJECT)


def latest_with(**changes: Any) -> dict[str, Any]:
    """The latest version with fields replaced (name -> field dict) or appended."""
    schema = json.loads(json.dumps(FileRegistry().latest.schema.json))
    names = [f["name"] for f in schema["fields"]]
    for name, fld in changes.items():
        if name in names:
            schema["fields"][names.index(name)] = fld
        else:
            schema["fields"].append(fld)
    return schema


class TestFileRegistry:
    def test_ids_are_the_codecs(self) -> None:
        """The manifest the checker reads is the one the codec frames with."""
        files = FileRegistry()
        assert [v.id for v in files.versions] == known_schema_ids()
        assert files.latest.id == latest_schema_id()
        for v in files.versions:
            assert v.schema.json["name"] == schema_by_id(v.id)["name"].rsplit(".", 1)[-1]

    def test_a_schema_fastavro_refuses_cannot_be_published(self, tmp_path: Any) -> None:
        """A decimal with scale > precision is ignored by the spec but refused by the codec."""
        from auditpipe.schemas.compat import SchemaError

        bad = {"type": "bytes", "logicalType": "decimal", "precision": 2, "scale": 4}
        (tmp_path / "x.avsc").write_text(json.dumps(bad))
        (tmp_path / "registry.json").write_text(
            json.dumps({"versions": [{"version": 1, "id": 1, "file": "x.avsc"}]})
        )
        with pytest.raises(SchemaError, match=r"x\.avsc: SchemaParseException"):
            FileRegistry(tmp_path)


class TestConfluentRegistry:
    def test_sync_registers_every_version_with_the_manifest_ids(self) -> None:
        registry = mock_registry("sync")
        assert registry.sync() == IDS
        assert [n for n, _ in registry.registered()] == PUBLISHED
        assert registry.sync() == IDS  # idempotent: same schemas, same ids

    def test_fetch_by_id_returns_the_registered_schema(self) -> None:
        registry = mock_registry("fetch")
        registry.sync()
        assert registry.fetch(2).json == FileRegistry().by_id(2).schema.json
        with pytest.raises(RegistryError, match="get schema id 99 failed"):
            registry.fetch(99)

    def test_compatible_new_version_is_registered(self) -> None:
        registry = mock_registry("compatible")
        registry.sync()
        new = latest_with(region={"name": "region", "type": ["null", "string"], "default": None})
        assert registry.check_compatibility(new) == []
        assert registry.register(new) == NEXT
        assert [n for n, _ in registry.registered()] == [*PUBLISHED, NEXT]

    def test_incompatible_version_is_refused_before_it_reaches_the_registry(self) -> None:
        """A required new field breaks BACKWARD: refused with the path, nothing registered."""
        registry = mock_registry("incompatible")
        registry.sync()
        new = latest_with(region={"name": "region", "type": "string"})
        problems = registry.check_compatibility(new)
        assert {str(p) for p in problems} == {
            "AuditEvent.region: reader field has no default and the writer has no field of "
            "that name"
        }
        assert {p.writer for p in problems} == {f"{SUBJECT} v{n}" for n in PUBLISHED}
        with pytest.raises(IncompatibleSchemaError, match=r"AuditEvent\.region") as info:
            registry.register(new)
        assert len(info.value.problems) == len(PUBLISHED)
        assert [n for n, _ in registry.registered()] == PUBLISHED
        assert registry.register(new, mode="NONE") == NEXT  # the mode is the caller's choice

    def test_mismatched_ids_are_reported_not_silently_used(self) -> None:
        """If the registry hands out other ids, the framing would lie: sync says so."""
        registry = mock_registry("taken")
        registry.client.register_schema("other-subject", Schema('"string"', "AVRO"))
        with pytest.raises(RegistryError, match=r"id 2, but registry.json fixes id 1"):
            registry.sync()

    def test_from_url_uses_confluent_kafkas_client(self) -> None:
        registry = ConfluentRegistry.from_url("mock://from-url", subject="s")
        assert type(registry.client).__name__ == "MockSchemaRegistryClient"
        assert registry.subject == "s" and registry.registered() == []


class TestRegisterCommand:
    def test_registers_every_version_at_the_configured_url(
        self, tmp_path: Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from auditpipe.cli import main

        config = tmp_path / "auditpipe.toml"
        config.write_text('[registry]\nurl = "mock://register-command"\nsubject = "s"\n')
        assert main(["schemas", "register", "--config", str(config)]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"s version {n} (audit_event.v{n}.avsc): id {IDS[n]}" for n in PUBLISHED
        ]

    def test_without_a_url_is_a_configuration_error(
        self, tmp_path: Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from auditpipe.cli import main

        config = tmp_path / "auditpipe.toml"
        config.write_text("[registry]\n")
        assert main(["schemas", "register", "--config", str(config)]) == 2
        assert "[registry] url is not set" in capsys.readouterr().err


class TestServerSideCheck:
    def test_server_compatible_asks_the_registry_with_the_subject_and_schema(self) -> None:
        """The mock client has no compatibility endpoint, so a recording stand-in answers."""

        class Client:
            def __init__(self) -> None:
                self.calls: list[tuple[str, Any]] = []

            def test_compatibility(self, subject: str, schema: Schema) -> bool:
                self.calls.append((subject, schema))
                return False

        client = Client()
        registry = ConfluentRegistry(client, SUBJECT)
        assert registry.server_compatible(FileRegistry().latest.schema) is False
        [(subject, schema)] = client.calls
        assert subject == SUBJECT and schema.schema_type == "AVRO"
        assert json.loads(schema.schema_str) == FileRegistry().latest.schema.json
