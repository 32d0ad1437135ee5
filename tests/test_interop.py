"""Wire interop with confluent-kafka's Avro serdes: our bytes are theirs and theirs are ours."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest
from auditpipe.schemas import Event, decode, encode, new_event
from auditpipe.schemas.registry import ConfluentRegistry, FileRegistry
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

SUBJECT = "auditpipe.AuditEvent"
CTX = SerializationContext("auditpipe.events", MessageField.VALUE)


@pytest.fixture
def client() -> Any:
    """A mock Schema Registry holding our versions under their registry.json ids."""
    client = SchemaRegistryClient.new_client({"url": "mock://interop"})
    assert ConfluentRegistry(client, SUBJECT).sync() == {
        v.version: v.id for v in FileRegistry().versions
    }
    return client


def event() -> Event:
    return new_event(
        request_id="req-interop",
        endpoint="/v1/chat/completions",
        model="m",
        status_code=200,
        metadata={"ticket": "SN-1"},
        input={"messages": [{"role": "user", "content": "héllo"}]},
        output={"choices": [{"message": {"role": "assistant", "content": "hi"}}]},
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        tenant="acme",
        tags={"env": "test"},
        cost={"input_usd": 0.1, "output_usd": 0.2, "total_usd": 0.3, "estimated": False},
    )


def as_avro_record(e: Event) -> dict[str, Any]:
    """The Avro record of an event: input/output are JSON text on the wire."""
    return {
        **e,
        "input": orjson.dumps(e["input"]).decode(),
        "output": orjson.dumps(e["output"]).decode(),
    }


def serializer(client: Any, schema_id: int) -> AvroSerializer:
    """Their serializer, writing with the schema registered under ``schema_id``."""
    text = client.get_schema(schema_id).schema_str
    return AvroSerializer(
        client,
        text,
        conf={
            "auto.register.schemas": False,
            "subject.name.strategy": lambda ctx, record_name: SUBJECT,
        },
    )


class TestOurBytesTheirDeserializer:
    def test_latest_version_decodes_with_avro_deserializer(self, client: Any) -> None:
        e = event()
        record = AvroDeserializer(client)(encode(e), CTX)
        assert record == as_avro_record(e)

    def test_v1_bytes_read_as_v2_by_their_deserializer(self, client: Any) -> None:
        """Their resolution against our v1 bytes fills v2's defaults, as our codec does."""
        e = event()
        v1_fields = {f["name"] for f in FileRegistry().by_id(1).schema.json["fields"]}
        v2_text = json.dumps(FileRegistry().by_id(2).schema.json)
        record = AvroDeserializer(client, v2_text)(encode(e, schema_id=1), CTX)
        assert record["tenant"] is None and record["tags"] == {} and record["cost"] is None
        assert {k: record[k] for k in v1_fields} == {k: as_avro_record(e)[k] for k in v1_fields}


class TestTheirBytesOurCodec:
    def test_avro_serializer_output_decodes_with_our_codec(self, client: Any) -> None:
        e = event()
        data = serializer(client, 2)(as_avro_record(e), CTX)
        assert data[:5] == b"\x00\x00\x00\x00\x02"
        assert decode(data) == e

    def test_their_v1_bytes_decode_into_v2_and_into_a_v1_reader(self, client: Any) -> None:
        e = event()
        v1_fields = {f["name"] for f in FileRegistry().by_id(1).schema.json["fields"]}
        v1_record = {k: v for k, v in as_avro_record(e).items() if k in v1_fields}
        data = serializer(client, 1)(v1_record, CTX)
        assert data[:5] == b"\x00\x00\x00\x00\x01"
        as_v2 = decode(data)
        assert as_v2["tenant"] is None and as_v2["cost"] is None and as_v2["input"] == e["input"]
        assert decode(data, reader_schema_id=1) == {k: e[k] for k in v1_fields}


class TestPlainAvro:
    def test_body_equals_a_plain_fastavro_write(self) -> None:
        """Tagging union branches for speed changes no byte of the body."""
        import io

        import fastavro
        from auditpipe.schemas import latest_schema_id, schema_by_id

        e = event()
        e["error"] = {"type": "timeout", "message": "upstream"}
        e["latency_ms"], e["chunk_count"], e["sample_rate"] = 12, 3, 1.0
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema_by_id(latest_schema_id()), as_avro_record(e))
        assert encode(e)[5:] == buf.getvalue()

    @pytest.mark.parametrize(
        ("name", "value", "named"),
        [
            ("model", 123, "AuditEvent.model: 123 is not string"),
            ("latency_ms", "slow", "AuditEvent.latency_ms: 'slow' is not double"),
            ("usage", {"prompt_tokens": "many"}, "Usage.prompt_tokens: 'many' is not long"),
        ],
    )
    def test_a_wrong_type_in_a_union_field_is_still_named(
        self, name: str, value: Any, named: str
    ) -> None:
        from auditpipe.schemas import EventValidationError, validate

        e = event()
        e[name] = value
        with pytest.raises(EventValidationError) as info:
            encode(e)
        assert named in str(info.value)
        with pytest.raises(EventValidationError, match=re.escape(named)):
            validate(e)

    def test_branch_tags_fit_every_kind_of_nullable_field(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Logical, enum, fixed and named-reference branches are tagged; arrays are not."""
        import io

        import fastavro
        from auditpipe.schemas import codec

        schema = fastavro.parse_schema(
            {
                "type": "record",
                "name": "T",
                "namespace": "x",
                "fields": [
                    {
                        "name": "a",
                        "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}],
                    },
                    {
                        "name": "b",
                        "type": ["null", {"type": "enum", "name": "E", "symbols": ["A"]}],
                    },
                    {"name": "c", "type": ["null", {"type": "fixed", "name": "F", "size": 2}]},
                    {"name": "d", "type": ["null", "E"]},
                    {"name": "e", "type": ["null", {"type": "array", "items": "int"}]},
                ],
            }
        )
        monkeypatch.setattr(codec, "schema_by_id", lambda _sid: schema)
        codec._nullable_branches.cache_clear()
        try:
            record = {"a": 5, "b": "A", "c": b"ab", "d": "A", "e": [1]}
            tagged = codec._to_wire_record(record, 99)
        finally:
            codec._nullable_branches.cache_clear()
        assert {k: v for k, v in tagged.items() if isinstance(v, tuple)} == {
            "a": ("long", 5), "b": ("x.E", "A"), "c": ("x.F", b"ab"), "d": ("x.E", "A")
        }  # fmt: skip

        def write(r: dict[str, Any]) -> bytes:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, schema, r)
            return buf.getvalue()

        assert write(tagged) == write(record)
