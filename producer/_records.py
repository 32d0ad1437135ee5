"""Audit records written by inference servers, read back as AuditEvents (``auditpipe ingest``).

:func:`read_line` takes one line of a server's output and says what it is:

- an audit record -> ``("record", event)``, the event built like a live capture's (caps,
  metadata limits, usage, stream assembly) with a deterministic ``event_id``;
- one of the server's other log lines -> ``("other", reason)``;
- something that claims to be an audit record but cannot be read -> ``("malformed", reason,
  message)``.

Accepted, also mixed on one stream:

- the Dynamo ``store=true`` record (``log_type: "audit"``, ``ts_ms``, ``request_id``,
  ``endpoint``, ``model``, ``store``, ``metadata``, ``input``, ``output``, ``usage``), and
  auditpipe's own JSON events (its superset, e.g. from ``DYN_AUDIT_STDOUT=1``), which keep
  their ``event_id``;
- Dynamo's ``AuditRecord`` (``schema_version``, ``request_id``, ``requested_streaming``,
  ``model``, ``request``, ``response``) as its JSONL sink writes it, and as its stderr sink logs
  it through ``tracing``: a JSONL log line whose ``record`` field holds the record as a string
  (``DYN_LOGGING_JSONL=true``) or a readable line ending ``record={...}``;
- any of these behind a text prefix (timestamps, a ``kubectl logs --prefix`` label), or inside
  a container runtime's log line: Docker's json-file ``{"log": ..., "time": ...}`` and the CRI
  format of Kubernetes nodes (``TIME stdout F ...``), whose long lines come split in partial
  pieces that :class:`LineFramer` joins.

The deterministic id: records have no id of their own, so the event id is derived from the
record's content (:func:`auditpipe.producer._event.derived_event_id`): a line read twice, after a
restart or from two copies of a log, is one event for the sinks, which dedupe by ``event_id``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import orjson
from auditpipe.schemas import Event, EventValidationError, from_json, validate

from auditpipe.settings import ProducerSettings

from . import _event
from ._event import Exchange

Result = tuple[str, Any, str]  # ("record", event, "") | ("other"|"malformed", reason, message)

_CRI = re.compile(rb"^(\d{4}-\d\d-\d\dT\S+) (stdout|stderr) ([FP]) ?(.*)$", re.DOTALL)
_AUDIT_HINTS = (b'"log_type":"audit"', b'"log_type": "audit"', b'log_type="audit"',
                b"dynamo_llm::audit")  # fmt: skip
_FRACTION = re.compile(r"(\.\d{6})\d+")
_RECORD_FIELD = re.compile(rb"\brecord=(\{.*\})\s*$", re.DOTALL)


class LineFramer:
    """Logical lines out of one file's physical lines: container runtimes split long lines
    (CRI ``P`` pieces, Docker json-file pieces without a final newline); the pieces are joined
    per stream. ``pending_start()`` is the offset of the first piece still waiting, which a
    saved read position must not pass."""

    def __init__(self) -> None:
        self._parts: dict[bytes, tuple[int, list[bytes], str | None]] = {}

    def feed(self, line: bytes, start: int) -> tuple[bytes, str | None] | None:
        """(content, container timestamp) of a complete line, or None while pieces wait."""
        if line[:1].isdigit():
            m = _CRI.match(line)
            if m:
                return self._piece(m.group(2), m.group(4), m.group(3) == b"P", start,
                                   m.group(1).decode("ascii", "replace"))  # fmt: skip
        if line.startswith(b'{"log":'):
            try:
                wrapper = orjson.loads(line)
            except orjson.JSONDecodeError:
                return line, None
            if isinstance(wrapper, dict) and isinstance(wrapper.get("log"), str):
                text: str = wrapper["log"]
                stream = str(wrapper.get("stream") or "").encode()
                partial = not text.endswith("\n")
                ts = wrapper.get("time") if isinstance(wrapper.get("time"), str) else None
                return self._piece(stream, text.rstrip("\n").encode(), partial, start, ts)
        return line, None

    def _piece(
        self, stream: bytes, content: bytes, partial: bool, start: int, ts: str | None
    ) -> tuple[bytes, str | None] | None:
        if partial:
            first, parts, first_ts = self._parts.get(stream, (start, [], ts))
            parts.append(content)
            self._parts[stream] = (first, parts, first_ts)
            return None
        if stream in self._parts:
            _, parts, first_ts = self._parts.pop(stream)
            return b"".join([*parts, content]), first_ts
        return content, ts

    def pending_start(self) -> int | None:
        return min((first for first, _, _ in self._parts.values()), default=None)

    def reset(self) -> None:
        self._parts.clear()


def read_line(
    line: bytes,
    cfg: ProducerSettings,
    allowlist: frozenset[str],
    *,
    default_endpoint: str = "/v1/chat/completions",
    ts: str | None = None,
) -> Result:
    """Classify and map one logical line (see the module docstring). Never raises."""
    text = line.strip()
    if not text:
        return "other", "empty", ""
    value, error = _find_json(text)
    if value is None:
        if any(hint in text for hint in _AUDIT_HINTS):
            return "malformed", "bad_json", error or "no JSON object in an audit line"
        return "other", "not_json", ""
    try:
        return _classify(value, cfg, allowlist, default_endpoint, ts, depth=0)
    except (EventValidationError, TypeError, ValueError) as exc:
        return "malformed", "invalid", str(exc)[:1024]


def _find_json(text: bytes) -> tuple[Any, str]:
    """The JSON object the line holds (whole, after a prefix, or as ``record={...}``)."""
    error = ""
    candidates = [text]
    m = _RECORD_FIELD.search(text)
    if m:
        candidates.insert(0, m.group(1))
    brace = text.find(b"{")
    if brace > 0:
        candidates.append(text[brace:])
    for candidate in candidates:
        if not candidate.startswith(b"{"):
            continue
        try:
            value = orjson.loads(candidate)
        except orjson.JSONDecodeError as exc:
            error = error or f"not JSON: {exc}"
            continue
        if isinstance(value, dict):
            return value, ""
    return None, error


def _classify(
    value: dict[str, Any],
    cfg: ProducerSettings,
    allowlist: frozenset[str],
    default_endpoint: str,
    ts: str | None,
    depth: int,
) -> Result:
    record = value.get("record")
    if (
        depth == 0
        and record is not None
        and (value.get("log_type") == "audit" or "audit" in str(value.get("target", "")))
    ):  # a log line carrying the record (Dynamo's tracing output)
        if isinstance(record, str):
            try:
                record = orjson.loads(record)
            except orjson.JSONDecodeError as exc:
                return "malformed", "bad_json", f"record field is not JSON: {exc}"
        if not isinstance(record, dict):
            return "malformed", "invalid", "record field is not a JSON object"
        wrapper_ts = value.get("time") or value.get("timestamp")
        return _classify(record, cfg, allowlist, default_endpoint,
                         wrapper_ts if isinstance(wrapper_ts, str) else ts, depth + 1)  # fmt: skip
    if value.get("log_type") == "audit":
        if isinstance(value.get("event_id"), str) and "endpoint" in value:
            return "record", _auditpipe_event(value), ""
        return "record", _dynamo_record(value, cfg, allowlist, default_endpoint, ts), ""
    if (
        "schema_version" in value
        and "request_id" in value
        and ("request" in value or "response" in value)
    ):
        return "record", _audit_record(value, cfg, allowlist, default_endpoint, ts), ""
    if depth:
        return "malformed", "invalid", "the record field holds no audit record"
    return "other", "not_audit", ""


def _auditpipe_event(value: dict[str, Any]) -> Event:
    """An event auditpipe rendered itself: kept as it is (its own event_id), validated."""
    try:
        return from_json(orjson.dumps(value))
    except Exception as exc:  # DecodeError: say what does not fit
        raise ValueError(str(exc)) from None


def _dynamo_record(
    rec: dict[str, Any],
    cfg: ProducerSettings,
    allowlist: frozenset[str],
    default_endpoint: str,
    ts: str | None,
) -> Event:
    endpoint = _opt(rec, "endpoint", str) or default_endpoint
    x = Exchange(endpoint, _opt(rec, "method", str) or "POST")
    x.request = rec.get("input")
    output = rec.get("output")
    if isinstance(output, list) and all(isinstance(c, dict) for c in output):
        x.chunks, x.streamed = list(output), True  # a stream logged chunk by chunk
    elif isinstance(output, str) and output.lstrip().startswith("data:"):
        x.response_bytes, x.response_is_sse = output.encode(), True
    else:
        x.response = output
    x.status = _opt(rec, "status_code", int)
    x.metadata = rec.get("metadata")
    headers = _opt(rec, "headers", dict) or {}
    x.headers = [(str(k), str(v)) for k, v in headers.items()]
    x.incomplete = _opt(rec, "incomplete", bool) or False
    x.latency_ms = _opt(rec, "latency_ms", float)
    x.ttft_ms = _opt(rec, "ttft_ms", float)
    x.trace_id = _opt(rec, "trace_id", str)
    x.span_id = _opt(rec, "span_id", str)
    x.traceparent = _opt(rec, "traceparent", str)
    overrides: dict[str, Any] = {}
    store = _opt(rec, "store", bool)
    if store is not None:
        overrides["store"] = store
    stream = _opt(rec, "stream", bool)
    if stream is not None:
        x.streamed = x.streamed or stream
    usage = _opt(rec, "usage", dict)
    if usage is not None:
        overrides["usage"] = _event.usage_of({"usage": usage})
    error = _opt(rec, "error", dict)
    if error is not None:
        overrides["error"] = {"type": str(error.get("type") or error.get("code") or "error"),
                              "message": str(error.get("message") or "")[:2048]}  # fmt: skip
    return _finish(x, rec, overrides, cfg, allowlist, ts)


def _audit_record(
    rec: dict[str, Any],
    cfg: ProducerSettings,
    allowlist: frozenset[str],
    default_endpoint: str,
    ts: str | None,
) -> Event:
    """Dynamo's AuditRecord: one per chat completion; ``response`` absent when the client
    cancelled or the request timed out (recorded as incomplete)."""
    x = Exchange(default_endpoint)
    x.request = rec.get("request")
    x.response = rec.get("response")
    x.streamed = _opt(rec, "requested_streaming", bool) or False
    x.status = 200 if x.response is not None else None
    x.incomplete = x.response is None
    request = x.request if isinstance(x.request, dict) else {}
    overrides: dict[str, Any] = {"store": request.get("store") is True}
    return _finish(x, rec, overrides, cfg, allowlist, ts)


def _finish(
    x: Exchange,
    rec: dict[str, Any],
    overrides: dict[str, Any],
    cfg: ProducerSettings,
    allowlist: frozenset[str],
    ts: str | None,
) -> Event:
    ts_ms = _opt(rec, "ts_ms", int)
    if ts_ms is None:
        ts_ms = _parse_time(ts)
    request_id = rec.get("request_id")
    if request_id is not None and not isinstance(request_id, str | int):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
    canonical = orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)
    event_id = _event.derived_event_id(ts_ms, canonical)
    x.request_id = str(request_id) if request_id is not None else event_id.replace("-", "")
    x.ts_ms = ts_ms if ts_ms is not None else _now_ms()
    x.model_hint = _opt(rec, "model", str)
    x.forced = True  # the server already decided this exchange is recorded
    overrides["event_id"] = event_id
    x.overrides = overrides
    event = _event.build(x, cfg, allowlist)
    assert event is not None
    validate(event)
    return event


def _opt(rec: dict[str, Any], key: str, kind: type) -> Any:
    """``rec[key]`` when present and of ``kind`` (ints pass as floats); a value of another type
    is an error naming the key; absent or null: None."""
    value = rec.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{key} must be {kind.__name__}, got {type(value).__name__}")


def _parse_time(value: str | None) -> int | None:
    """Unix ms of an RFC 3339 time (nanoseconds allowed), or None."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(_FRACTION.sub(r"\1", value.replace("Z", "+00:00")))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return int(parsed.timestamp() * 1000)


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000
