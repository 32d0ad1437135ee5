"""Building an AuditEvent from a captured exchange: ids, trace context, headers, caps, metadata.

Everything here is pure and runs on the producer's sender thread, except
:func:`current_trace`, which reads the OpenTelemetry context and so must run on the request's
own task (the middleware calls it before the app runs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import uuid
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from auditpipe.schemas import Event, new_event, new_event_id

from auditpipe.redaction import CREDENTIAL_HEADERS
from auditpipe.settings import ProducerSettings

from . import _stream

#: Request headers that are never recorded, whatever ``header_allowlist`` says (the redact
#: step removes the same names wherever they appear in a record).
NEVER_RECORDED = CREDENTIAL_HEADERS

#: OpenAI's limits on ``metadata``.
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512

TRUNCATED_MARKER = "_auditpipe_truncated"

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_OTEL_AVAILABLE = importlib.util.find_spec("opentelemetry") is not None


def new_request_id() -> str:
    """A random id for requests that came without ``x-request-id`` (32 hex digits)."""
    return os.urandom(16).hex()


def parse_traceparent(value: str | None) -> tuple[str | None, str | None]:
    """(trace_id, span_id) from a W3C ``traceparent``; (None, None) when invalid."""
    if not value:
        return None, None
    m = _TRACEPARENT.match(value.strip().lower())
    if not m or m.group(1) == "ff":
        return None, None
    trace_id, span_id = m.group(2), m.group(3)
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None, None
    return trace_id, span_id


def current_trace() -> tuple[str | None, str | None]:
    """The current OpenTelemetry span's ids, when opentelemetry is installed and a span is live."""
    if not _OTEL_AVAILABLE:
        return None, None
    try:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
    except Exception:
        pass
    return None, None


def filter_headers(
    headers: Iterable[tuple[str | bytes, str | bytes]], allowlist: frozenset[str]
) -> dict[str, str]:
    """Allowed request headers (names lower-cased); credentials never pass. Accepts ASGI's
    ``(bytes, bytes)`` pairs or strings."""
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        key = name.lower()
        if key in allowlist and key not in NEVER_RECORDED:
            out[key] = value
    return out


def limit_metadata(metadata: Any) -> tuple[dict[str, str], int]:
    """What of ``metadata`` fits OpenAI's limits, and how many pairs were left out."""
    if not isinstance(metadata, Mapping):
        return {}, (1 if metadata not in (None, {}) else 0)
    kept: dict[str, str] = {}
    dropped = 0
    for key, value in metadata.items():
        if not isinstance(value, str):
            value = orjson.dumps(value).decode() if value is not None else ""
        key = str(key)
        if (
            len(kept) >= METADATA_MAX_PAIRS
            or len(key) > METADATA_MAX_KEY_CHARS
            or len(value) > METADATA_MAX_VALUE_CHARS
        ):
            dropped += 1
            continue
        kept[key] = value
    return kept, dropped


def cap_payload(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """``value``, or an explicit truncation marker when its JSON is over ``max_bytes``."""
    if value is None:
        return None, False
    try:
        data = orjson.dumps(value)
    except TypeError:  # pydantic models, NotGiven, ...: their JSON form (or repr)
        data = orjson.dumps(value, default=_json_default)
        value = orjson.loads(data)
    if len(data) <= max_bytes:
        return value, False
    return {
        TRUNCATED_MARKER: True,
        "original_bytes": len(data),
        "kept_bytes": max_bytes,
        "head": data[:max_bytes].decode("utf-8", "ignore"),
    }, True


def _json_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return dump(mode="json", exclude_unset=True)
        except Exception:
            pass
    return repr(value)


def usage_of(output: Any) -> dict[str, int | None] | None:
    """OpenAI usage (chat/completions/embeddings/responses shapes) as the event's Usage."""
    usage = output.get("usage") if isinstance(output, dict) else None
    if not isinstance(usage, dict):
        return None

    def num(*keys: str) -> int | None:
        for k in keys:
            v = usage.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    prompt = num("prompt_tokens", "input_tokens")
    completion = num("completion_tokens", "output_tokens")
    total = num("total_tokens")
    if total is None and prompt is not None:
        total = prompt + (completion or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def error_of(output: Any, status: int | None, exc: BaseException | None) -> dict[str, str] | None:
    body_error = isinstance(output, dict) and output.get("error") is not None
    if exc is not None and not (status is not None and status >= 400 and body_error):
        return {"type": type(exc).__name__, "message": str(exc)[:2048]}
    if status is None or status < 400:
        return None
    err = output.get("error") if isinstance(output, dict) else None
    if isinstance(err, dict):
        return {
            "type": str(err.get("type") or err.get("code") or f"http_{status}"),
            "message": str(err.get("message") or "")[:2048],
        }
    if isinstance(err, str):  # OIP v2: {"error": "message"}
        return {"type": f"http_{status}", "message": err[:2048]}
    return {"type": f"http_{status}", "message": ""}


def derived_event_id(ts_ms: int | None, *parts: str | bytes) -> str:
    """A deterministic event id for an exchange read from a record (a log line, a CloudEvent):
    the same ``parts`` always give the same id, so a record read twice (a restart, a
    redelivery) is deduplicated by the sinks, which are idempotent by ``event_id``.

    Laid out like the UUIDv7 of live captures (48-bit Unix milliseconds first, so ids sort by
    time), but version 8 ("custom", RFC 9562): the other 74 bits are a SHA-256 of ``parts``.
    Without a timestamp the time bits come from the hash too.
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x00")
    h = int.from_bytes(digest.digest()[:16], "big")
    ms = (h >> 80) if ts_ms is None or ts_ms < 0 else ts_ms
    value = (ms & ((1 << 48) - 1)) << 80 | 0x8 << 76 | (h >> 64 & 0xFFF) << 64 | 0b10 << 62
    return str(uuid.UUID(int=value | (h & ((1 << 62) - 1))))


def _zstd_decompressor() -> Any:
    for name in ("compression.zstd", "backports.zstd"):  # the standard library from 3.14
        try:
            return importlib.import_module(name).ZstdDecompressor()
        except ImportError:
            continue
    return None


def decode_body(data: bytes, encoding: str, max_bytes: int) -> tuple[bytes | None, bool]:
    """Undo an HTTP ``content-encoding`` (gzip, deflate, zstd; several in order) for
    capture: (the decoded bytes, or None when a coding is unknown, not installed or the data is
    corrupt; whether the output was cut at ``max_bytes``, so a small body cannot expand into a
    huge one on the sender thread)."""
    cut = False
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        try:
            if coding in ("gzip", "x-gzip", "deflate"):
                wbits = 16 + zlib.MAX_WBITS if coding != "deflate" else zlib.MAX_WBITS
                if coding == "deflate" and data[:1] and data[0] & 0x0F != 8:
                    wbits = -zlib.MAX_WBITS  # raw deflate, as some servers send it
                d = zlib.decompressobj(wbits)
                out = d.decompress(data, max_bytes)
                cut = cut or bool(d.unconsumed_tail)
            elif coding == "zstd":
                z = _zstd_decompressor()
                if z is None:
                    return None, cut
                out = z.decompress(data, max_bytes)
                cut = cut or (not z.eof and not z.needs_input)  # more output was left
            else:  # br among them: no brotli binding bounds its output
                return None, cut
                return None, cut
        except Exception:
            return None, cut
        data = out
    return data, cut


def parse_json(data: bytes) -> Any:
    """JSON body, or a marker saying what it was when it is not JSON."""
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return {"_auditpipe_non_json_body": True, "bytes": len(data)}


class Exchange:
    """What a capture saw; :func:`build` turns it into an event on the sender thread.

    A plain slotted class: the middleware creates one per request, so it must be cheap.
    """

    __slots__ = (
        "allowlist", "cfg", "chunks", "collect_truncated", "endpoint", "exc", "extra_chunks",
        "forced", "headers", "incomplete", "latency_ms", "metadata", "method", "model_hint",
        "overrides", "provider", "provider_request_id", "request", "request_bytes",
        "request_encoding", "request_id", "response", "response_bytes", "response_encoding",
        "response_is_json", "response_is_sse", "span_id", "status", "store_header", "streamed",
        "trace_id", "traceparent", "ts_ms", "ttft_ms",
    )  # fmt: skip

    def __init__(self, endpoint: str, method: str = "POST", ts_ms: int = 0) -> None:
        self.endpoint = endpoint
        self.method = method
        self.ts_ms = ts_ms
        self.request_id = ""
        self.request: Any = None  # parsed body (dict) or None
        self.request_bytes: bytes | None = None  # raw body, parsed lazily
        self.response: Any = None
        self.response_bytes: bytes | list[bytes] | None = None
        self.response_is_sse = False
        self.response_is_json = True
        self.status: int | None = None
        self.exc: BaseException | None = None
        self.incomplete = False
        self.streamed = False
        self.chunks: list[Any] | None = None  # pre-parsed stream chunks (client wrapper)
        self.extra_chunks = 0
        self.collect_truncated = False
        self.headers: Iterable[tuple[str | bytes, str | bytes]] = ()
        self.trace_id: str | None = None
        self.span_id: str | None = None
        self.traceparent: str | None = None
        self.latency_ms: float | None = None
        self.ttft_ms: float | None = None
        self.model_hint: str | None = None
        self.metadata: Any = None
        self.forced = False  # header x-auditpipe-store, or an explicit library capture
        self.store_header = False  # the request said x-auditpipe-store: true
        self.provider: str | None = None  # who answered (the openai client wrapper)
        self.provider_request_id: str | None = None
        self.cfg: ProducerSettings | None = None  # set when the exchange is emitted as is
        self.allowlist: frozenset[str] = frozenset()
        # content-encoding of the captured bytes (a proxy passes compressed bodies through)
        self.request_encoding: bytes | str | None = None
        self.response_encoding: bytes | str | None = None
        # fields set on the event as given (event_id, error, tags... of a record read back)
        self.overrides: dict[str, Any] | None = None

    def __call__(self) -> Event | None:
        """The event (see :func:`build`) with ``cfg`` and ``allowlist``: the middleware emits
        the exchange itself, one object fewer per request for the garbage collector to scan
        while it waits in the queue (a ``partial`` would be another)."""
        assert self.cfg is not None
        return build(self, self.cfg, self.allowlist)


_TEMPLATE: Event = {}
_MUTABLE: tuple[str, ...] = ()


def _event(**fields: Any) -> Event:
    """``new_event(**fields)`` for the sender's hot path: the schema defaults are computed once
    (mutable ones copied per event) instead of per call. Field names are this module's own."""
    global _TEMPLATE, _MUTABLE
    if not _TEMPLATE:
        template = new_event()
        for key in ("event_id", "ts_ms", "request_id", "endpoint"):
            template.pop(key)
        _MUTABLE = tuple(k for k, v in template.items() if isinstance(v, dict | list))
        _TEMPLATE = template
    event = dict(_TEMPLATE)
    for key in _MUTABLE:
        event[key] = _TEMPLATE[key].copy()
    event.update(fields)
    event["event_id"] = new_event_id()
    return event


def build(x: Exchange, cfg: ProducerSettings, allowlist: frozenset[str]) -> Event | None:
    """The event for ``x``, or None when it is not to be captured (gating)."""
    if isinstance(x.response_bytes, list):
        x.response_bytes = b"".join(x.response_bytes)
    if x.request_encoding or x.response_encoding:
        _decode_bodies(x, cfg.max_payload_bytes * 4)
    body = x.request
    if body is None and x.request_bytes is not None:
        body = parse_json(x.request_bytes)
    store_body = isinstance(body, dict) and (
        body.get("store") is True
        or (isinstance(body.get("parameters"), dict) and body["parameters"].get("store") is True)
    )
    if not (cfg.capture == "all" or x.forced or store_body):
        return None
    # ``store`` says what the request asked (its body or the x-auditpipe-store header), not
    # why it was captured: with capture = "all" or an explicit capture it may be false
    asked = store_body or x.store_header
    output = x.response
    chunk_count = None
    if x.chunks is not None or x.response_is_sse:
        chunks = x.chunks
        if chunks is None:
            chunks, _ = _stream.parse_sse(x.response_bytes or b"")
        chunk_count = len(chunks) + x.extra_chunks
        output = _stream.assemble(chunks)
    elif output is None and x.response_bytes:
        output = parse_json(x.response_bytes) if x.response_is_json else {
            "_auditpipe_non_json_body": True, "bytes": len(x.response_bytes)}  # fmt: skip
    metadata = x.metadata if x.metadata is not None else (
        body.get("metadata") if isinstance(body, dict) else None)  # fmt: skip
    kept, meta_dropped = limit_metadata(metadata)
    model = x.model_hint
    if isinstance(output, dict) and isinstance(output.get("model"), str):
        model = model or output["model"]
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        model = model or body["model"]
    if model is None and isinstance(output, dict) and isinstance(output.get("model_name"), str):
        model = output["model_name"]
    if x.trace_id is None:
        x.trace_id, x.span_id = parse_traceparent(x.traceparent)
    usage = usage_of(output)
    status = x.status if x.status is not None else (500 if x.exc is not None else None)
    error = error_of(output, status, x.exc)
    capped_in, t_in = cap_payload(body, cfg.max_payload_bytes)
    capped_out, t_out = cap_payload(output, cfg.max_payload_bytes)
    event = _event(
        request_id=x.request_id or new_request_id(),
        ts_ms=x.ts_ms,
        endpoint=x.endpoint,
        method=x.method,
        status_code=status,
        model=model,
        store=asked,
        stream=x.streamed or x.response_is_sse,
        metadata=kept,
        metadata_dropped=meta_dropped,
        headers=filter_headers(x.headers, allowlist),
        input=capped_in,
        output=capped_out,
        truncated=t_in or t_out or x.collect_truncated,
        usage=usage,
        error=error,
        latency_ms=x.latency_ms,
        ttft_ms=x.ttft_ms,
        trace_id=x.trace_id,
        span_id=x.span_id,
        incomplete=x.incomplete,
        chunk_count=chunk_count,
        provider=x.provider,
        provider_request_id=x.provider_request_id,
    )
    if x.overrides:
        event.update(x.overrides)
    return event


def _decode_bodies(x: Exchange, max_bytes: int) -> None:
    """Decode content-encoded captured bodies in place; a body that cannot be decoded becomes
    a marker naming its encoding (never the compressed bytes parsed as JSON)."""
    for attr, enc_attr in (("request_bytes", "request_encoding"),
                           ("response_bytes", "response_encoding")):  # fmt: skip
        encoding, data = getattr(x, enc_attr), getattr(x, attr)
        if not encoding or not data:
            continue
        if isinstance(encoding, bytes):
            encoding = encoding.decode("latin-1")
        decoded, cut = decode_body(data, encoding, max_bytes)
        x.collect_truncated = x.collect_truncated or cut
        if decoded is not None:
            setattr(x, attr, decoded)
            continue
        marker = {"_auditpipe_non_json_body": True, "bytes": len(data),
                  "content_encoding": encoding}  # fmt: skip
        setattr(x, attr, None)
        if attr == "request_bytes":
            x.request = marker
        else:
            x.response, x.response_is_sse = marker, False
