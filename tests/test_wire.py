"""The wire format's helpers in auditpipe.schemas: what other parts use instead of parsing bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from auditpipe.schemas import (
    DecodeError,
    encode,
    known_schema_ids,
    latest_schema_id,
    new_event,
    peek_event_id,
    schema_by_id,
    schema_id_of,
)
from auditpipe.schemas.avsc import SchemaError
from auditpipe.schemas.manifest import read_manifest
from auditpipe.schemas.wire import read_long, write_long


class TestPeekEventId:
    def test_every_schema_starts_with_the_event_id_string(self) -> None:
        """peek_event_id relies on it: event_id is field 0, a plain string, in every version."""
        for sid in known_schema_ids():
            first = schema_by_id(sid)["fields"][0]
            assert (first["name"], first["type"]) == ("event_id", "string"), sid

    @pytest.mark.parametrize("event_id", ["e", "0190c2d4-aaaa-7bbb-8ccc-0123456789ab", "é" * 80])
    def test_reads_the_event_id_of_an_encoded_event(self, event_id: str) -> None:
        """The key the producer needs, read without decoding the rest."""
        assert peek_event_id(encode(new_event(event_id=event_id))) == event_id.encode()

    @pytest.mark.parametrize(
        "data",
        [b"", b"\x00\x00\x00\x00\x03", b"\x00\x00\x00\x00\x03\x80", b"\x00\x00\x00\x00\x03\x14ab",
         b"\x00\x00\x00\x00\x03\x00rest", b"\x00\x00\x00\x00\x03" + b"\xff" * 11],
        ids=["empty", "header_only", "varint_cut", "string_cut", "empty_id", "varint_too_long"],
    )  # fmt: skip
    def test_bytes_without_an_event_id_give_none(self, data: bytes) -> None:
        """Truncated or malformed bytes never raise and never yield a wrong key."""
        assert peek_event_id(data) is None


class TestSchemaIdOf:
    def test_reads_the_framed_schema_id(self) -> None:
        assert schema_id_of(encode(new_event())) == latest_schema_id()

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"\x00\x00", "truncated"),
            (b'{"a": 1}', "bad_magic"),
            (b"\x01\x00\x00\x00\x01", "bad_magic"),
        ],
    )
    def test_unframed_bytes_raise_with_a_reason(self, data: bytes, reason: str) -> None:
        with pytest.raises(DecodeError) as info:
            schema_id_of(data)
        assert info.value.reason == reason


class TestVarints:
    @pytest.mark.parametrize("n", [0, 1, -1, 63, -64, 64, 2**31, -(2**63), 2**63 - 1])
    def test_write_then_read_is_the_identity(self, n: int) -> None:
        out = bytearray(b"x")
        write_long(out, n)
        assert read_long(bytes(out), 1) == (n, len(out))


class TestManifest:
    def test_the_one_reader_agrees_with_the_codec(self) -> None:
        """The codec's ids are the manifest's: one reader, one answer."""
        manifest = read_manifest()
        assert [e.id for e in manifest.entries] == known_schema_ids()
        assert manifest.subject == "auditpipe.AuditEvent"

    @pytest.mark.parametrize(
        ("text", "message"),
        [("{", "not JSON"), ("{}", 'needs a "versions" list'), ('{"versions": []}', "no versions"),
         ('{"versions": [{"id": 1, "file": "a"}]}', "missing 'version'"),
         ('{"versions": [{"version": 1, "id": 1, "file": "a"}, '
          '{"version": 2, "id": 1, "file": "b"}]}', "id 1 is used twice")],
    )  # fmt: skip
    def test_a_bad_manifest_is_refused_naming_the_problem(
        self, tmp_path: Path, text: str, message: str
    ) -> None:
        (tmp_path / "registry.json").write_text(text)
        with pytest.raises(SchemaError, match=message):
            read_manifest(tmp_path)
