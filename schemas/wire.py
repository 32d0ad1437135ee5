"""The bytes on Kafka: the Confluent framing and Avro's zigzag varints, in one place.

Wire format of an AuditEvent value (Confluent framing)::

    byte 0      magic byte, always 0
    bytes 1-4   schema id, big-endian unsigned (ids are fixed in registry.json)
    bytes 5-    Avro binary body, written with that schema

Nothing outside :mod:`auditpipe.schemas` parses these bytes by hand: code that needs a detail
of a framed value (its schema id, its event id) asks a function here.
"""

from __future__ import annotations

import struct
from typing import Any

from auditpipe.errors import AuditpipeError

MAGIC = 0
HEADER = struct.Struct(">bI")

#: An event in Python: the JSON rendering of the Avro record, as a plain dict.
Event = dict[str, Any]


class DecodeError(AuditpipeError):
    """Bytes that are not a decodable AuditEvent. ``reason`` is a short machine-readable tag."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def frame_header(schema_id: int) -> bytes:
    """The 5-byte Confluent header of a value written with ``schema_id``."""
    return HEADER.pack(MAGIC, schema_id)


def schema_id_of(data: bytes | bytearray | memoryview) -> int:
    """The schema id in the Confluent header of ``data``. Raises :class:`DecodeError` (reason
    ``truncated`` or ``bad_magic``) when ``data`` is not framed Avro."""
    if len(data) < HEADER.size:
        raise DecodeError(
            f"{len(data)} byte(s) is shorter than the 5-byte Confluent header", "truncated"
        )
    magic, schema_id = HEADER.unpack_from(data)
    if magic != MAGIC:
        hint = " (it looks like JSON text)" if bytes(data[:1]) in (b"{", b"[") else ""
        raise DecodeError(
            f"magic byte is {data[0]:#04x}, expected 0x00: not Confluent-framed Avro{hint}",
            "bad_magic",
        )
    return int(schema_id)


def write_long(out: bytearray, n: int) -> None:
    """Append ``n`` as an Avro long (zigzag varint)."""
    n = (n << 1) ^ (n >> 63)
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def write_string(out: bytearray, s: str) -> None:
    """Append ``s`` as an Avro string (length, then UTF-8)."""
    b = s.encode()
    write_long(out, len(b))
    out += b


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The Avro long (zigzag varint) at ``pos``: (value, position after it). Raises IndexError
    when ``data`` ends inside it and ValueError when it is longer than 10 bytes."""
    shift = n = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def peek_event_id(value: bytes) -> bytes | None:
    """The ``event_id`` (UTF-8 bytes) of a framed value without decoding the rest, or None when
    the bytes do not hold one. Every AuditEvent schema has ``event_id`` as its first field, a
    string, which is what makes this cheap: the producer keys records by it."""
    try:
        length, pos = read_long(value, HEADER.size)
    except (IndexError, ValueError):
        return None
    if length <= 0 or pos + length > len(value):
        return None
    return bytes(value[pos : pos + length])
