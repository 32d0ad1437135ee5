"""The AuditEvent codec: Avro with the Confluent framing, the JSON rendering, event ids."""

from __future__ import annotations

import struct
import uuid

import fastavro
import orjson
import pytest
from auditpipe.schemas import (
    DecodeError,
    EventValidationError,
    decode,
    encode,
    from_json,
    latest_schema_id,
    new_event,
    schema_by_id,
    to_json,
    uuid7,
)


def full_event() -> dict:
    return new_event(
        request_id="req_123",
        endpoint="/v1/chat/completions",
        method="POST",
        status_code=200,
        model="meta/llama3-8b-instruct",
        store=True,
        stream=False,
        metadata={"ticket": "SN-1234"},
        headers={"user-agent": "test"},
        input={"messages": [{"role": "user", "content": "héllo ✓"}], "temperature": 0.2},
        output={"choices": [{"message": {"role": "assistant", "content": "hi"}}]},
        usage={"prompt_tokens": 123, "completion_tokens": 456, "total_tokens": 579},
        error=None,
        latency_ms=12.5,
        ttft_ms=3.25,
        trace_id="425ef761ca5b44c795b4c912f1d84b39",
        span_id="6959a1b2d1ee41a5",
        source={"service": "svc", "instance": "pod-1"},
    )


class TestFraming:
    def test_round_trip_is_identity(self) -> None:
        """Every field survives encode -> decode, input/output come back as objects."""
        event = full_event()
        assert decode(encode(event)) == event

    def test_header_is_magic_zero_and_big_endian_schema_id(self) -> None:
        """Byte 0 is 0 and bytes 1-4 are the registered schema id, big-endian."""
        data = encode(full_event())
        assert data[0] == 0
        assert struct.unpack(">I", data[1:5])[0] == latest_schema_id()

    def test_body_is_plain_avro_with_json_text_payloads(self) -> None:
        """After the header, a standard Avro reader sees input/output as JSON text."""
        event = full_event()
        data = encode(event)
        import io

        record = fastavro.schemaless_reader(io.BytesIO(data[5:]), schema_by_id(latest_schema_id()))
        assert isinstance(record, dict)
        assert orjson.loads(record["input"]) == event["input"]
        assert record["usage"]["total_tokens"] == 579

    def test_minimal_event_gets_defaults(self) -> None:
        """new_event() alone is a valid event with a fresh time-ordered id."""
        event = new_event()
        decoded = decode(encode(event))
        assert decoded["log_type"] == "audit"
        assert decoded["processing"] == [] and decoded["metadata"] == {}
        assert uuid.UUID(decoded["event_id"]).version == 7


class TestDecodeErrors:
    @pytest.mark.parametrize(
        ("data", "reason", "fragment"),
        [
            (b"", "truncated", "shorter than the 5-byte"),
            (b"\x00\x00", "truncated", "shorter than the 5-byte"),
            (b'{"log_type":"audit"}', "bad_magic", "looks like JSON"),
            (b"\x01\x00\x00\x00\x01abc", "bad_magic", "magic byte is 0x01"),
            (b"\x00\x00\x00\x03\xe7abc", "unknown_schema", "unknown schema id 999"),
            (b"\x00\x00\x00\x00\x01\xff\xff\xff", "bad_body", "does not decode"),
        ],
    )
    def test_each_failure_names_its_reason(self, data: bytes, reason: str, fragment: str) -> None:
        """Undecodable bytes raise DecodeError with a reason tag and a message saying why."""
        with pytest.raises(DecodeError) as info:
            decode(data)
        assert info.value.reason == reason
        assert fragment in str(info.value)

    def test_none_is_a_tombstone(self) -> None:
        """A null value is reported as such, not as a crash."""
        with pytest.raises(DecodeError, match="tombstone"):
            decode(None)

    def test_trailing_bytes_are_rejected(self) -> None:
        """A valid body followed by junk is not silently accepted."""
        with pytest.raises(DecodeError, match="trailing"):
            decode(encode(full_event()) + b"junk")

    def test_truncated_body(self) -> None:
        """A body cut short fails with DecodeError, not EOFError."""
        data = encode(full_event())
        with pytest.raises(DecodeError) as info:
            decode(data[: len(data) // 2])
        assert info.value.reason == "bad_body"


class TestValidation:
    def test_wrong_type_names_the_field(self) -> None:
        """An event that does not fit the schema is refused with the field named."""
        event = full_event()
        event["status_code"] = "two hundred"
        with pytest.raises(EventValidationError, match="status_code"):
            encode(event)

    def test_unknown_field_is_refused_by_new_event(self) -> None:
        with pytest.raises(EventValidationError, match="colour"):
            new_event(colour="red")


class TestJsonRendering:
    def test_is_a_superset_of_the_dynamo_record(self) -> None:
        """The JSON line carries every key of the Dynamo store=true audit record."""
        rendered = orjson.loads(to_json(full_event()))
        dynamo = {"log_type", "ts_ms", "request_id", "endpoint", "model", "store", "metadata",
                  "input", "output", "usage"}  # fmt: skip
        assert dynamo <= set(rendered)
        assert rendered["input"]["messages"][0]["content"] == "héllo ✓"

    def test_json_round_trip(self) -> None:
        event = full_event()
        assert from_json(to_json(event)) == event

    def test_from_json_rejects_garbage(self) -> None:
        with pytest.raises(DecodeError):
            from_json(b"not json")
        with pytest.raises(DecodeError, match="object"):
            from_json(b"[1, 2]")


class TestEventIds:
    def test_uuid7_is_time_ordered_and_unique(self) -> None:
        """Ids made in sequence sort in creation order, even within one millisecond."""
        ids = [uuid7() for _ in range(5000)]
        assert len(set(ids)) == len(ids)
        assert [i.int for i in ids] == sorted(i.int for i in ids)
        assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids[:10])


class TestVersions:
    def test_v1_bytes_decode_with_v2_defaults(self) -> None:
        """An event written by a v1 producer is read as v2 with the new fields' defaults."""
        event = full_event()
        data = encode(event, schema_id=1)
        assert struct.unpack(">I", data[1:5])[0] == 1
        decoded = decode(data)
        assert decoded["request_id"] == "req_123" and decoded["usage"] == event["usage"]
        assert (
            decoded["tenant"] is None and decoded["tags"] == {} and decoded["incomplete"] is False
        )

    def test_v2_bytes_decode_with_a_v1_reader(self) -> None:
        """A v1-pinned reader drops the fields it does not know."""
        event = full_event()
        event["tenant"] = "acme"
        decoded = decode(encode(event), reader_schema_id=1)
        assert "tenant" not in decoded and decoded["model"] == event["model"]
