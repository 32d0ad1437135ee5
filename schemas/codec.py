"""The AuditEvent codec: Confluent-framed Avro for Kafka, the JSON rendering for people.

In Python an event is a plain ``dict`` in the *JSON rendering*: the Avro record's fields, with
``input`` and ``output`` as JSON values (objects) rather than JSON text. Processor steps and
sinks work on that dict; only the codec sees Avro.

The wire format (the Confluent framing) is described and parsed in :mod:`.wire`; the schemas
come from the manifest (:mod:`.manifest`); the generated fast paths from :mod:`.fastenc`.

Every way bytes can fail to be an event raises :class:`DecodeError`, whose message says why.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import fastavro
import fastavro.validation
import orjson

from auditpipe.errors import AuditpipeError

from .fastenc import compile_decoder, compile_encoder
from .ids import new_event_id
from .manifest import known_schema_ids, latest_schema_id, schema_by_id
from .wire import HEADER, DecodeError, Event, frame_header, schema_id_of


class EventValidationError(AuditpipeError):
    """An event dict that does not match the AuditEvent schema (the message names the field)."""


# ---------------------------------------------------------------------------------------------
# Building and validating events


def _field_defaults(schema_id: int) -> list[tuple[str, Any, bool]]:
    """(name, default, has_default) per field, in schema order."""
    out = []
    for f in schema_by_id(schema_id)["fields"]:
        out.append((f["name"], f.get("default"), "default" in f))
    return out


def new_event(**fields: Any) -> Event:
    """A complete event: ``fields`` plus a fresh ``event_id``, ``ts_ms`` now, defaults elsewhere.

    ``request_id`` defaults to the event id and ``endpoint`` to ``""`` so that a minimal call
    yields a valid event. Unknown field names raise :class:`EventValidationError`.
    """
    event: Event = {}
    known = set()
    for name, default, has_default in _field_defaults(latest_schema_id()):
        known.add(name)
        if name in fields:
            event[name] = fields[name]
        elif has_default:
            event[name] = _copy_default(default)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise EventValidationError(f"unknown AuditEvent field(s): {', '.join(unknown)}")
    event.setdefault("event_id", new_event_id())
    event.setdefault("ts_ms", time.time_ns() // 1_000_000)
    event.setdefault("request_id", event["event_id"])
    event.setdefault("endpoint", "")
    return event


def _copy_default(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_default(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_default(v) for v in value]
    return value


def _to_avro_record(event: Event) -> dict[str, Any]:
    record = dict(event)
    for key in ("input", "output"):
        value = record.get(key)
        if value is not None:
            try:
                record[key] = orjson.dumps(value).decode()
            except TypeError as exc:
                raise EventValidationError(
                    f"AuditEvent.{key}: not JSON-serialisable: {exc}"
                ) from exc
    return record


@cache
def _nullable_branches(schema_id: int) -> tuple[tuple[str, str], ...]:
    """``(field, branch name)`` of each top-level ``["null", X]`` field of the schema.

    X is named as fastavro's tuple notation names it: a named type by its full name, anything
    else by its type. Arrays and maps are left out (their values need no tag to be cheap).
    """
    out = []
    for f in schema_by_id(schema_id)["fields"]:
        t = f["type"]
        if not (isinstance(t, list) and len(t) == 2 and t[0] == "null"):
            continue
        branch = t[1]
        if isinstance(branch, dict):
            kind = branch.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                branch = branch["name"]
            elif isinstance(kind, str) and kind not in ("array", "map"):
                branch = kind  # a primitive with a logical type
            else:
                continue
        out.append((f["name"], branch))
    return tuple(out)


def _to_wire_record(event: Event, schema_id: int) -> dict[str, Any]:
    """The Avro record, with non-null union values tagged with their branch.

    fastavro's tuple notation ``(branch, value)`` tells the writer which branch to write instead
    of letting it try every branch against the value, which costs about a fifth of the encode
    time of a typical event and three quarters of its validation, where every failed branch
    formats an error message (benchmarks/codec_bench.py). A value of the wrong type still fails,
    and :func:`validate` names the field.
    """
    record = _to_avro_record(event)
    for name, branch in _nullable_branches(schema_id):
        value = record.get(name)
        if value is not None:
            record[name] = (branch, value)
    return record


def validate(event: Event, schema_id: int | None = None) -> None:
    """Raise :class:`EventValidationError` naming the first field that does not fit the schema."""
    sid = schema_id or latest_schema_id()
    schema = schema_by_id(sid)
    try:  # tagged unions: fastavro no longer tries (and formats an error for) each branch
        fastavro.validation.validate(_to_wire_record(event, sid), schema, raise_errors=True)
    except fastavro.validation.ValidationError as exc:
        raise EventValidationError(f"invalid AuditEvent: {_describe_validation(exc)}") from exc


def _describe_validation(exc: fastavro.validation.ValidationError) -> str:
    try:
        errors = exc.errors  # list of ValidationErrorData(datum, schema, field)
        parts = [f"{e.field or 'AuditEvent'}: {e.datum!r} is not {e.schema}" for e in errors]
        return "; ".join(parts)
    except Exception:  # pragma: no cover - formatting only
        return str(exc)


# ---------------------------------------------------------------------------------------------
# Avro with the Confluent framing


def encode(event: Event, schema_id: int | None = None) -> bytes:
    """Frame and encode ``event``. Raises :class:`EventValidationError` when it does not fit."""
    sid = schema_id or latest_schema_id()
    fast = _fast_encoder(sid)
    if fast is not None:
        try:
            return fast(event)
        except Exception:  # does not fit: fastavro below says why (or manages after all)
            pass
    return encode_with_fastavro(event, sid)


def encode_with_fastavro(event: Event, sid: int) -> bytes:
    """The reference encoder (fastavro); :func:`encode` uses it when the fast path refuses."""
    schema = schema_by_id(sid)
    buf = io.BytesIO()
    buf.write(frame_header(sid))
    try:
        fastavro.schemaless_writer(buf, schema, _to_wire_record(event, sid))
    except EventValidationError:
        raise
    except Exception as exc:  # fastavro raises TypeError/ValueError/KeyError/AttributeError
        validate(event, sid)  # names the field when it can
        raise EventValidationError(f"invalid AuditEvent: {type(exc).__name__}: {exc}") from exc
    return buf.getvalue()


@cache
def _fast_decoder(schema_id: int) -> Callable[[bytes], Event] | None:
    return compile_decoder(schema_id)  # generated from the schema; same values as fastavro


@cache
def _fast_encoder(schema_id: int) -> Callable[[Event], bytes] | None:
    return compile_encoder(schema_id)  # generated from the schema; same bytes as fastavro


def decode(
    data: bytes | bytearray | memoryview | None, reader_schema_id: int | None = None
) -> Event:
    """Decode framed Avro into an event dict (JSON rendering). Raises :class:`DecodeError`."""
    if data is None:
        raise DecodeError("no value: the record is a tombstone (null value)", "empty")
    data = bytes(data)
    schema_id = schema_id_of(data)
    try:
        writer = schema_by_id(schema_id)
    except KeyError:
        raise DecodeError(
            f"unknown schema id {schema_id} (known: {known_schema_ids()})", "unknown_schema"
        ) from None
    reader_id = reader_schema_id or latest_schema_id()
    if reader_id == schema_id:
        fast = _fast_decoder(schema_id)
        if fast is not None:
            try:
                return fast(data)
            except Exception:  # does not decode: fastavro below says why (or manages after all)
                pass
    return decode_with_fastavro(data, schema_id, writer, reader_id)


def decode_with_fastavro(data: bytes, schema_id: int, writer: Any, reader_id: int) -> Event:
    """The reference decoder (fastavro, with schema resolution when ``reader_id`` differs);
    :func:`decode` uses it for other schemas and when the fast path refuses."""
    reader = schema_by_id(reader_id)
    body = io.BytesIO(data)
    body.seek(HEADER.size)
    try:
        record = fastavro.schemaless_reader(body, writer, reader if reader is not writer else None)
    except Exception as exc:
        raise DecodeError(
            f"Avro body does not decode with schema id {schema_id}: {type(exc).__name__}: {exc}",
            "bad_body",
        ) from exc
    if body.tell() != len(data):
        raise DecodeError(
            f"{len(data) - body.tell()} trailing byte(s) after the Avro body "
            f"(schema id {schema_id})",
            "bad_body",
        )
    if not isinstance(record, dict):  # pragma: no cover - the schema is a record
        raise DecodeError("Avro body is not a record", "bad_body")
    for key in ("input", "output"):
        text = record.get(key)
        if text is not None:
            try:
                record[key] = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise DecodeError(
                    f"AuditEvent.{key} is not valid JSON text: {exc}", "bad_json"
                ) from exc
    return record


# ---------------------------------------------------------------------------------------------
# JSON rendering


def to_json(event: Event) -> bytes:
    """The JSON rendering as one line of UTF-8 (no trailing newline)."""
    return orjson.dumps(event)


def to_json_line(event: Event) -> bytes:
    """:func:`to_json` and a newline (JSONL), in one allocation."""
    return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)


def from_json(line: bytes | str) -> Event:
    """Parse one JSON-rendered event and validate it. Raises :class:`DecodeError`."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}", "bad_json") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"expected a JSON object, got {type(value).__name__}", "bad_json")
    event = new_event(**{k: v for k, v in value.items() if k in _known_fields()})
    try:
        validate(event)
    except EventValidationError as exc:
        raise DecodeError(str(exc), "invalid") from exc
    return event


@lru_cache(maxsize=1)
def _known_fields() -> frozenset[str]:
    return frozenset(name for name, _, _ in _field_defaults(latest_schema_id()))
