"""The generated encoder and decoder (the codec's fast paths) write and read exactly what
fastavro does, and refuse what does not fit (the codec then falls back to fastavro, which names
the field or says why the bytes do not decode)."""

from __future__ import annotations

import random
import string

import pytest
from auditpipe.schemas import DecodeError, decode, latest_schema_id, new_event, schema_by_id
from auditpipe.schemas.codec import decode_with_fastavro, encode_with_fastavro
from auditpipe.schemas.fastenc import compile_decoder, compile_encoder

SID = latest_schema_id()
ENCODE = compile_encoder(SID)
DECODE = compile_decoder(SID)


def reference_decode(data: bytes) -> dict[str, object]:
    return decode_with_fastavro(data, SID, schema_by_id(SID), SID)


def text(rng: random.Random, n: int) -> str:
    alphabet = string.ascii_letters + 'éü漢字🙂\n"\\ '
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def random_event(rng: random.Random) -> dict[str, object]:
    maybe = lambda v: v if rng.random() < 0.5 else None  # noqa: E731
    return new_event(
        request_id=text(rng, 20),
        endpoint="/v1/" + text(rng, 10),
        ts_ms=rng.randint(0, 2**45),
        status_code=maybe(rng.randint(-(2**31), 2**31 - 1)),
        model=maybe(text(rng, 12)),
        store=rng.random() < 0.5,
        stream=rng.random() < 0.5,
        metadata={text(rng, 8): text(rng, 30) for _ in range(rng.randint(0, 5))},
        headers={text(rng, 8): text(rng, 30) for _ in range(rng.randint(0, 3))},
        input=maybe({"messages": [{"role": "user", "content": text(rng, 200)}], "n": 1.5}),
        output=maybe([1, "two", {"three": None}, text(rng, 50)]),
        usage=maybe({"prompt_tokens": maybe(rng.randint(0, 2**40)),
                     "completion_tokens": maybe(-rng.randint(0, 99)), "total_tokens": None}),
        error=maybe({"type": text(rng, 10), "message": text(rng, 40)}),
        latency_ms=maybe(rng.random() * 1e4),
        ttft_ms=maybe(float(rng.randint(0, 10))),
        trace_id=maybe("0" * 32),
        source={"service": maybe(text(rng, 5)), "instance": maybe(text(rng, 5))},
        incomplete=rng.random() < 0.5,
        chunk_count=maybe(rng.randint(0, 1000)),
        truncated=rng.random() < 0.5,
        metadata_dropped=rng.randint(0, 20),
        tags={text(rng, 5): text(rng, 5) for _ in range(rng.randint(0, 2))},
        cost=maybe({"input_usd": rng.random(), "output_usd": 0.0, "total_usd": 1.25,
                    "estimated": rng.random() < 0.5}),
    )  # fmt: skip


class TestGeneratedEncoder:
    def test_the_schema_is_supported(self) -> None:
        """The current schema compiles (else the producer silently uses the slower codec)."""
        assert ENCODE is not None

    def test_bytes_equal_the_codec_on_random_events(self) -> None:
        """500 random events (unicode, negatives, empty and full maps, nulls): same bytes."""
        assert ENCODE is not None
        rng = random.Random(7)
        for _ in range(500):
            event = random_event(rng)
            assert ENCODE(event) == encode_with_fastavro(event, SID)
            assert decode(ENCODE(event))["request_id"] == event["request_id"]

    @pytest.mark.parametrize(
        ("field", "value"),
        [("status_code", "200"), ("model", 5), ("metadata", {"k": 1}), ("ts_ms", 1.5),
         ("latency_ms", "fast"), ("usage", {"prompt_tokens": "x"})],
    )  # fmt: skip
    def test_what_does_not_fit_raises(self, field: str, value: object) -> None:
        """A wrong type raises, so the producer asks the codec (which names the field)."""
        assert ENCODE is not None
        event = new_event()
        event[field] = value
        with pytest.raises(Exception):  # noqa: B017 - any error means "fall back"
            ENCODE(event)


class TestGeneratedDecoder:
    def test_the_schema_is_supported(self) -> None:
        assert DECODE is not None

    def test_values_and_key_order_equal_fastavro_on_random_events(self) -> None:
        """500 random events: the same dict as fastavro's, keys in the same order (the JSON
        rendering of a decoded event is byte-identical either way)."""
        assert DECODE is not None
        rng = random.Random(11)
        for _ in range(500):
            data = encode_with_fastavro(random_event(rng), SID)
            fast, ref = DECODE(data), reference_decode(data)
            assert fast == ref
            assert list(fast) == list(ref)

    def test_blocked_maps_written_by_other_encoders_decode(self) -> None:
        """Avro lets a writer split a map into blocks with byte sizes (negative counts)."""
        assert DECODE is not None
        event = new_event(metadata={"a": "1", "b": "2"})
        data = encode_with_fastavro(event, SID)
        plain = bytes([4]) + b"\x02a\x021\x02b\x022" + bytes([0])  # count 2, pairs, end
        assert plain in data
        blocked = bytes([1, 8]) + b"\x02a\x021" + bytes([1, 8]) + b"\x02b\x022" + bytes([0])
        rewritten = data.replace(plain, blocked, 1)
        assert DECODE(rewritten)["metadata"] == {"a": "1", "b": "2"}
        assert reference_decode(rewritten)["metadata"] == {"a": "1", "b": "2"}

    def test_malformed_bytes_raise_the_same_decode_error_as_fastavro(self) -> None:
        """Cut short anywhere, trailing bytes, or a bad union branch: the fast path refuses
        and decode() reports what the fastavro path reports."""
        data = encode_with_fastavro(random_event(random.Random(3)), SID)
        broken = [data[:n] for n in range(5, len(data), 7)] + [data + b"\x00"]
        broken.append(data[:5] + bytes([9]) + data[6:])  # first field's union branch 9 (4.5)
        for bad in broken:
            with pytest.raises(DecodeError) as fast_path:
                decode(bad)
            with pytest.raises(DecodeError) as reference:
                reference_decode(bad)
            assert fast_path.value.reason == reference.value.reason
