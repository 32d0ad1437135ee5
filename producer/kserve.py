"""The KServe inference-logger receiver: ``auditpipe receive``.

KServe's logger (``spec.predictor.logger: {mode: all, url: ...}``; the agent's
``pkg/logger``) posts two CloudEvents per inference: the request, when it arrives, and the
response, when it was answered, both with the same ``ce-id`` (the inference request's
``Ce-Id`` header, or a fresh UUID), types ``org.kubeflow.serving.inference.request`` and
``.response``, the extensions ``inferenceservicename``, ``namespace``, ``component``,
``endpoint`` (default/canary), ``metadata`` (the request headers named in ``metadataHeaders``,
as JSON ``{name: [values]}``), ``annotations`` and ``recordedtime``, and the payload bytes with
the *request's* content type. It sends only responses of status 200, from a queue of 100 slots
that blocks the inference path when the receiver is slow.

So this receiver:

- answers ``202`` as soon as the body is read and the event is filed (never after Kafka: the
  producer's ``emit()`` does not wait), and takes binary mode (``ce-*`` headers, percent-encoded
  values decoded), structured mode (``application/cloudevents+json``, ``data`` or
  ``data_base64``) and batches (``application/cloudevents-batch+json``); a type ending in
  ``.request`` / ``.response`` from any source works the same (Seldon's logger, for one);
- pairs request and response by (``source``, ``id``) in a bounded table, whichever comes first,
  into one AuditEvent (latency from the two event times); a request whose response has not come
  after ``pair_timeout_secs`` is recorded ``incomplete`` with the error ``no_response`` (the call
  failed, timed out, or is still running: KServe does not log non-200 answers), a response
  without its request likewise (``incomplete``, input missing); a ``statuscode`` extension, when
  a sender sets one, becomes the status, so non-200 outcomes are recorded as what they were;
- keeps memory bounded (``max_pending`` events, ``max_pending_bytes``): beyond either, the
  oldest waiting half is recorded unpaired at once and counted (``evicted``); a half seen again
  for an exchange already recorded is dropped (``duplicates``); at shutdown every waiting half
  is recorded (``flushed_at_stop``): nothing is lost;
- gives every event a deterministic ``event_id`` (from source, id and how it was paired): a
  redelivered pair is one event for the sinks;
- parses the payloads (OIP v1/v2, OpenAI JSON, an SSE stream) on the producer's thread, not in
  the handler: the endpoint is inferred from them (``/v1/chat/completions``,
  ``/v2/models/{isvc}/infer``, ``/v1/models/{isvc}:predict``...), the model is the payload's or
  the InferenceService's name, and the KServe attributes go into ``tags`` (``kserve.*``).

``GET /healthz`` answers 200; ``GET /metrics`` the producer's and the receiver's counters in
the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson

from auditpipe.settings import ReceiverSettings

from . import _event, _records
from ._event import Exchange
from ._producer import AuditProducer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CE_REQUEST = "org.kubeflow.serving.inference.request"
CE_RESPONSE = "org.kubeflow.serving.inference.response"
_STRUCTURED = b"application/cloudevents+json"
_BATCH = b"application/cloudevents-batch+json"
_REQUIRED = ("id", "source", "specversion", "type")
_CONTEXT = frozenset({"id", "source", "specversion", "type", "time", "datacontenttype",
                      "dataschema", "subject", "data", "data_base64"})  # fmt: skip
_KSERVE_TAGS = ("inferenceservicename", "namespace", "component", "endpoint")


class BadEvent(ValueError):
    """A request that carries no valid CloudEvent (answered 400 with this message)."""


@dataclass
class CloudEvent:
    id: str
    type: str
    source: str
    time: str | None = None
    content_type: str | None = None
    data: bytes | None = None  # the payload as sent (binary mode, data_base64, string data)
    value: Any = None  # structured mode's JSON ``data``, already parsed
    has_value: bool = False
    ext: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else 256


def parse_events(headers: list[tuple[bytes, bytes]], body: bytes) -> list[CloudEvent]:
    """The CloudEvents of one HTTP request (binary, structured or batched mode)."""
    ctype = b""
    ce: dict[str, str] = {}
    for name, value in headers:
        if name == b"content-type":
            ctype = value
        elif name.startswith(b"ce-"):
            ce[name[3:].decode("latin-1")] = unquote(value.decode("latin-1"))
    media = ctype.split(b";", 1)[0].strip().lower()
    if media == _BATCH:
        items = _json(body)
        if not isinstance(items, list):
            raise BadEvent("a batch must be a JSON array of events")
        return [_structured(item) for item in items]
    if media == _STRUCTURED or (media.startswith(b"application/cloudevents") and not ce):
        return [_structured(_json(body))]
    if "specversion" not in ce:
        raise BadEvent("no CloudEvent: neither ce-specversion headers nor a cloudevents type")
    missing = [k for k in _REQUIRED if not ce.get(k)]
    if missing:
        raise BadEvent(f"binary-mode event without ce-{', ce-'.join(missing)}")
    ext = {k: v for k, v in ce.items() if k not in _CONTEXT}
    return [CloudEvent(ce["id"], ce["type"], ce["source"], ce.get("time"),
                       ctype.decode("latin-1") or None, body, ext=ext)]  # fmt: skip


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadEvent(f"not JSON: {exc}") from None


def _structured(obj: Any) -> CloudEvent:
    if not isinstance(obj, dict):
        raise BadEvent("a structured event must be a JSON object")
    missing = [k for k in _REQUIRED if not isinstance(obj.get(k), str) or not obj[k]]
    if missing:
        raise BadEvent(f"structured event without {', '.join(missing)}")
    ext = {k: v if isinstance(v, str) else orjson.dumps(v).decode()
           for k, v in obj.items() if k not in _CONTEXT}  # fmt: skip
    event = CloudEvent(obj["id"], obj["type"], obj["source"],
                       obj.get("time") if isinstance(obj.get("time"), str) else None,
                       obj.get("datacontenttype") if isinstance(obj.get("datacontenttype"), str)
                       else None, ext=ext)  # fmt: skip
    if "data_base64" in obj:
        try:
            event.data = base64.b64decode(obj["data_base64"], validate=True)
        except (ValueError, TypeError) as exc:
            raise BadEvent(f"data_base64 is not base64: {exc}") from None
    elif "data" in obj:
        data = obj["data"]
        if isinstance(data, str) and "json" not in (event.content_type or "json"):
            event.data = data.encode()
        else:
            event.value, event.has_value = data, True
            event.data = orjson.dumps(data)
    return event


@dataclass
class _Pending:
    request: CloudEvent | None = None
    response: CloudEvent | None = None
    since: float = 0.0
    size: int = 0


class KServeReceiver:
    """ASGI app receiving the logger's CloudEvents; see the module docstring."""

    def __init__(self, producer: AuditProducer, cfg: ReceiverSettings | None = None) -> None:
        self.producer = producer
        self.cfg = cfg = cfg or producer.settings.receiver
        pcfg = producer.settings.producer
        if cfg.capture == "all":
            pcfg = pcfg.model_copy(update={"capture": "all"})
        self._pcfg = pcfg
        self._allow = frozenset(h.lower() for h in pcfg.header_allowlist)
        self._pending: collections.OrderedDict[tuple[str, str], _Pending] = (
            collections.OrderedDict()
        )
        self._pending_bytes = 0
        # exchanges recorded lately and how (paired, request_only, response_only): a half seen
        # again is a duplicate; the late other half of a lone one is recorded alone too
        self._done: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._done_max = max(cfg.max_pending, 10_000)
        self.stats: collections.Counter[str] = collections.Counter()
        self._registry: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_forever())
        method = scope.get("method", "POST")
        if method == "GET":
            await self._get(scope["path"], send)
            return
        if method not in ("POST", "PUT"):
            await _answer(send, 405, b'{"error": "POST CloudEvents here"}')
            return
        body = await self._body(scope, receive)
        if body is None:
            self.stats["too_large"] += 1
            await _answer(send, 413, b'{"error": "event larger than receiver.max_body_bytes"}')
            return
        try:
            events = parse_events(scope["headers"], body)
        except BadEvent as exc:
            self.stats["rejected"] += 1
            await _answer(send, 400, orjson.dumps({"error": str(exc)}))
            return
        for event in events:
            self.accept(event)
        await _answer(send, 202, b"")

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.cfg.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return None
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _get(self, path: str, send: Send) -> None:
        if path == "/healthz":
            await _answer(send, 200, b'{"status": "ok"}')
        elif path == "/metrics":
            body = self.metrics_text()
            await _answer(send, 200, body, b"text/plain; version=0.0.4; charset=utf-8")
        else:
            await _answer(send, 404, b'{"error": "not found"}')

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._sweeper = asyncio.ensure_future(self._sweep_forever())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- pairing -------------------------------------------------------------------------------

    def accept(self, event: CloudEvent) -> None:
        """File one event: pair it, or keep it until its other half (or the timeout) comes."""
        kind = _kind(event.type)
        if kind is None:
            self.stats["ignored_types"] += 1
            return
        self.stats[f"{kind}s"] += 1
        key = (event.source, event.id)
        done = self._done.get(key)
        if done is not None:  # its exchange was recorded already
            if done == "paired" or done.startswith(kind):
                self.stats["duplicates"] += 1
                return
            self.stats[f"late_{kind}s"] += 1  # the other half went out alone: this one too
            lone = _Pending(request=event) if kind == "request" else _Pending(response=event)
            self._emit(key, lone, f"{kind}_only")
            return
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(since=time.monotonic())
        if getattr(pending, kind) is not None:
            self.stats["duplicates"] += 1
            return
        setattr(pending, kind, event)
        pending.size += event.size
        self._pending_bytes += event.size
        if pending.request is not None and pending.response is not None:
            self._finish(key, "paired")
            return
        cfg = self.cfg
        while self._pending and (len(self._pending) > cfg.max_pending
                                 or self._pending_bytes > cfg.max_pending_bytes):  # fmt: skip
            oldest = next(iter(self._pending))
            self.stats["evicted"] += 1
            self._finish(oldest, None)

    def sweep(self, now: float | None = None) -> int:
        """Record the halves that waited longer than ``pair_timeout_secs``; how many."""
        now = time.monotonic() if now is None else now
        deadline = now - self.cfg.pair_timeout_secs
        count = 0
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            if pending.since > deadline:
                break
            self._finish(key, None)
            count += 1
        return count

    async def _sweep_forever(self) -> None:
        interval = min(1.0, self.cfg.pair_timeout_secs / 4)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def close(self) -> None:
        """Record every waiting half (the process is stopping); stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._pending:
            self.stats["flushed_at_stop"] += 1
            self._finish(next(iter(self._pending)), None)

    def _finish(self, key: tuple[str, str], how: str | None) -> None:
        pending = self._pending.pop(key)
        self._pending_bytes -= pending.size
        if how is None:
            how = "request_only" if pending.response is None else "response_only"
        self._emit(key, pending, how)

    def _emit(self, key: tuple[str, str], pending: _Pending, how: str) -> None:
        self.stats[how] += 1
        done = self._done.get(key)
        self._done[key] = "paired" if done is not None and done != how else how
        self._done.move_to_end(key)
        if len(self._done) > self._done_max:
            self._done.popitem(last=False)
        self.producer.emit(_Exchange(pending, how, self))

    # -- metrics -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, int]:
        return {**self.stats, "pending": len(self._pending), "pending_bytes": self._pending_bytes}

    def metrics_registry(self) -> Any:
        """A registry with the receiver's and its producer's stages (auditpipe.metrics)."""
        if self._registry is None:
            from auditpipe.metrics import make_registry, producer_stage, receiver_stage

            self._registry = make_registry(receiver_stage(self), producer_stage(self.producer))[0]
        return self._registry

    def metrics_text(self) -> bytes:
        from auditpipe.metrics import exposition

        return exposition(self.metrics_registry())[0]


def _kind(ce_type: str) -> str | None:
    if ce_type == CE_REQUEST or ce_type.endswith(".request"):
        return "request"
    if ce_type == CE_RESPONSE or ce_type.endswith(".response"):
        return "response"
    return None


class _Exchange:
    """The lazy capture of one pair (or half): built on the producer's thread."""

    __slots__ = ("how", "pending", "receiver")

    def __init__(self, pending: _Pending, how: str, receiver: KServeReceiver) -> None:
        self.pending, self.how, self.receiver = pending, how, receiver

    def __call__(self) -> dict[str, Any] | None:
        return build_event(self.pending.request, self.pending.response, self.how,
                           self.receiver._pcfg, self.receiver._allow,
                           self.receiver.cfg.pair_timeout_secs)  # fmt: skip


def build_event(
    request: CloudEvent | None,
    response: CloudEvent | None,
    how: str,
    cfg: Any,
    allowlist: frozenset[str],
    timeout_secs: float,
) -> dict[str, Any] | None:
    """The AuditEvent of a pair (``how``: paired, request_only, response_only)."""
    first = request or response
    assert first is not None
    ext = first.ext
    isvc = ext.get("inferenceservicename") or None
    req_ms = _records._parse_time(request.time) if request else None
    resp_ms = _records._parse_time(response.time) if response else None
    ts_ms = req_ms or resp_ms
    body = _payload(request)
    output = _payload(response)
    x = Exchange(_endpoint(body, output, isvc), "POST", ts_ms or time.time_ns() // 1_000_000)
    x.request_id = first.id
    if isinstance(body, bytes):
        x.request_bytes = body
    else:
        x.request = body
    if isinstance(output, bytes):
        x.response_bytes = output
        x.response_is_sse = output.lstrip().startswith(b"data:")
        x.response_is_json = not x.response_is_sse
    else:
        x.response = output
    status = ext.get("statuscode") if response is None else response.ext.get("statuscode")
    x.status = int(status) if status and status.isdigit() else (200 if response else None)
    x.incomplete = how != "paired"
    if req_ms is not None and resp_ms is not None:
        x.latency_ms = float(resp_ms - req_ms)
    x.model_hint = None
    x.traceparent = (request.ext if request else ext).get("traceparent")
    x.headers = _metadata_headers(ext.get("metadata"))
    tags = {f"kserve.{k}": ext[k] for k in _KSERVE_TAGS if ext.get(k)}
    tags["cloudevents.source"] = first.source
    tags["kserve.pairing"] = how
    overrides: dict[str, Any] = {
        "event_id": _event.derived_event_id(ts_ms, first.source, first.id, how),
        "tags": tags,
        "source": {"service": isvc, "instance": ext.get("namespace") or None},
    }
    if how == "request_only" and x.status is None:
        overrides["error"] = {
            "type": "no_response",
            "message": f"no response event within {timeout_secs:g} s: KServe logs only responses"
            " of status 200 (the call failed or timed out), or it is still running",
        }
    x.overrides = overrides
    event = _event.build(x, cfg, allowlist)
    if event is not None and event.get("model") is None:
        event["model"] = isvc
    return event


def _payload(event: CloudEvent | None) -> Any:
    """The parsed JSON payload, or its bytes (parsed later, or an SSE stream), or None."""
    if event is None:
        return None
    if event.has_value:
        return event.value
    data = event.data or b""
    if data.lstrip().startswith(b"data:"):
        return data
    try:
        return orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return data


def _endpoint(body: Any, output: Any, isvc: str | None) -> str:
    """The endpoint the payloads say was called (the logger does not send the path)."""
    req = body if isinstance(body, dict) else {}
    out = output if isinstance(output, dict) else {}
    if "messages" in req:
        return "/v1/chat/completions"
    if "prompt" in req and "model" in req:
        return "/v1/completions"
    if "input" in req and "model" in req:
        if out.get("object") == "list" or "data" in out or "encoding_format" in req:
            return "/v1/embeddings"
        return "/v1/responses"
    inputs = req.get("inputs")
    oip_v2 = isinstance(inputs, list) and all(isinstance(i, dict) and "datatype" in i
                                              for i in inputs)  # fmt: skip
    if (inputs and oip_v2) or "model_name" in out:
        return f"/v2/models/{isvc or 'model'}/infer"
    return f"/v1/models/{isvc or 'model'}:predict"


def _metadata_headers(value: str | None) -> list[tuple[str, str]]:
    """The ``metadata`` extension (``{header: [values]}`` as JSON) as header pairs."""
    if not value:
        return []
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return []
    out: list[tuple[str, str]] = []
    if isinstance(parsed, dict):
        for name, values in parsed.items():
            for v in values if isinstance(values, list) else [values]:
                out.append((str(name).lower(), str(v)))
    return out


async def _answer(send: Send, status: int, body: bytes,
                  ctype: bytes = b"application/json") -> None:  # fmt: skip
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", ctype))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
