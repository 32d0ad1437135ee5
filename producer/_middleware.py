"""AuditMiddleware: ASGI middleware that captures inference calls (FastAPI, Starlette, plain ASGI).

What the client receives is not changed: every ``http.response.body`` message is forwarded as it
comes (SSE stays unbuffered), with the same bytes. The one addition is ``x-request-id`` on
responses of captured paths when the app did not set one (``return_request_id``): the request's
own id, or the one generated for it (which the app finds in ``scope["auditpipe.request_id"]``).
Content-encoded bodies (``content-encoding: gzip``, as a proxied server may send them) are
captured as they pass and decoded when the event is built. The request path only keeps
references to the body messages and takes a few timestamps; gating, JSON parsing, SSE assembly
and building the event run on the producer's sender thread (the middleware emits a function
that builds the event). Exceptions of the app propagate unchanged after they were recorded;
failures of capture are counted by the producer, never raised.

Captured paths (``producer.capture_paths``): the OpenAI-compatible endpoints and the Open
Inference Protocol v2 ``/v2/models/{name}[/versions/{version}]/infer`` by default; ``{param}``
matches one path segment, ``{name}`` also names the model. Gating happens per request: the body
says ``"store": true``, or the header ``x-auditpipe-store: true``, or ``capture = "all"``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from auditpipe.settings import ProducerSettings, validate_model

from . import _event
from ._event import Exchange
from ._producer import AuditProducer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STORE_TRUE = (b"true", b"1", b"yes", b"on")

#: Scope key under which the middleware leaves the request id it generated for a captured
#: request that came without ``x-request-id`` (the wrapped app may pass it on).
REQUEST_ID_SCOPE_KEY = "auditpipe.request_id"


def compile_paths(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regex for ``patterns``; ``{param}`` matches a segment (captured by name)."""
    alternatives = []
    for i, pattern in enumerate(patterns):
        parts = re.split(r"\{(\w+)\}", pattern)
        regex = ""
        for j, part in enumerate(parts):
            if j % 2:
                # group names must be unique across alternatives
                regex += f"(?P<{part}__{i}>[^/]+)"
            else:
                regex += re.escape(part)
        alternatives.append(regex)
    return re.compile("^(?:" + "|".join(alternatives) + ")/?$")


class AuditMiddleware:
    """Wrap ``app``; emit one AuditEvent per captured exchange to ``producer``.

    ``paths``, ``header_allowlist`` and ``capture`` default to the producer's settings.
    """

    def __init__(
        self,
        app: ASGIApp,
        producer: AuditProducer,
        *,
        paths: Iterable[str] | None = None,
        header_allowlist: Iterable[str] | None = None,
        capture: str | None = None,
    ) -> None:
        self.app = app
        self.producer = producer
        cfg: ProducerSettings = producer.settings.producer
        updates: dict[str, Any] = {}
        if capture is not None:
            updates["capture"] = capture
        if paths is not None:
            updates["capture_paths"] = list(paths)
        if header_allowlist is not None:
            updates["header_allowlist"] = list(header_allowlist)
        if updates:  # invalid arguments raise ConfigError naming the producer.* key
            cfg = validate_model(
                ProducerSettings, {**cfg.model_dump(), **updates}, "AuditMiddleware", "producer"
            )
        self.cfg = cfg
        self.enabled = self.cfg.enabled and producer.enabled
        self._paths = compile_paths(self.cfg.capture_paths)
        self._name_groups = [g for g in self._paths.groupindex if g.startswith("name__")]
        self.header_allowlist = frozenset(h.lower() for h in self.cfg.header_allowlist)
        self._capture_all = self.cfg.capture == "all"
        self._return_id = self.cfg.return_request_id
        # streams are assembled from the raw SSE bytes, which are several times the output
        self._collect_limit = self.cfg.max_payload_bytes * 4

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        producer = self.producer
        started = producer._request_seen = time.perf_counter()  # the sender keeps out of the way
        match = self._paths.match(scope.get("path", ""))
        if match is None:
            await self.app(scope, receive, send)
            return

        x = Exchange(scope["path"], scope.get("method", "POST"), time.time_ns() // 1_000_000)
        request_id = None
        raw_headers = scope.get("headers") or ()
        for name, value in raw_headers:  # ASGI header names are lower-case bytes
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"x-auditpipe-store":
                x.forced = x.store_header = value.strip().lower() in _STORE_TRUE
            elif name == b"traceparent":
                x.traceparent = value.decode("latin-1")
            elif name == b"content-encoding":
                x.request_encoding = value
        x.headers = raw_headers  # filtered and decoded on the sender thread
        if request_id is None:
            # the app sees the id it will be recorded under (the proxy forwards it upstream)
            request_id = scope[REQUEST_ID_SCOPE_KEY] = _event.new_request_id()
        x.request_id = request_id
        x.trace_id, x.span_id = _event.current_trace()
        if self._name_groups:
            for key in self._name_groups:
                if match.group(key) is not None:
                    x.model_hint = match.group(key)
        add_id = (b"x-request-id", x.request_id.encode("latin-1")) if self._return_id else None

        request_body: list[bytes] = []
        response_body: list[bytes] = []
        state = {"size": 0, "first": 0.0, "finished": False, "last": 0.0}
        limit = self._collect_limit

        async def observe_receive() -> Message:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                body = message.get("body", b"")
                if body:
                    request_body.append(body)
            elif kind == "http.disconnect" and not state["finished"]:
                x.incomplete = True
            return message

        async def observe_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                last = not message.get("more_body", False)
                if last:  # before awaiting: the server may answer receive() with a disconnect
                    state["finished"] = True  # as soon as the last body is handed over
                try:
                    await send(message)
                except BaseException:
                    state["finished"] = False
                    raise
                body = message.get("body", b"")
                if body:
                    now = producer._request_seen = time.perf_counter()
                    if not state["first"]:
                        state["first"] = now
                    if state["size"] < limit:
                        response_body.append(body)
                        state["size"] += len(body)
                    elif x.response_is_sse:
                        x.extra_chunks += 1
                        x.collect_truncated = True
                    else:
                        x.collect_truncated = True
                if last:
                    state["last"] = producer._request_seen = time.perf_counter()
                return
            if kind == "http.response.start":
                x.status = message["status"]
                resp_headers = message.get("headers", ())
                has_id = False
                for k, v in resp_headers:
                    lk = k.lower()
                    if lk == b"content-type":
                        ctype = v.lower()
                        x.response_is_sse = ctype.startswith(b"text/event-stream")
                        x.response_is_json = b"json" in ctype
                    elif lk == b"x-request-id":
                        has_id = True
                    elif lk == b"content-encoding":
                        x.response_encoding = v
                if add_id is not None and not has_id:
                    message = dict(message)
                    message["headers"] = [*resp_headers, add_id]
            await send(message)

        try:
            await self.app(scope, observe_receive, observe_send)
        except BaseException as exc:
            x.exc = exc
            x.incomplete = True
            raise
        finally:
            self._finish(x, request_body, response_body, state, started)

    def _finish(
        self,
        x: Exchange,
        request_body: list[bytes],
        response_body: list[bytes],
        state: dict[str, Any],
        started: float,
    ) -> None:
        try:
            raw = request_body[0] if len(request_body) == 1 else b"".join(request_body)
            if not (self._capture_all or x.forced or b'"store"' in raw or x.request_encoding):
                return  # cheap gate; the exact one runs when the event is built
            if not state["finished"]:
                x.incomplete = True
            end = state["last"] or time.perf_counter()
            x.latency_ms = round((end - started) * 1000, 3)
            if state["first"]:
                x.ttft_ms = round((state["first"] - started) * 1000, 3)
            x.request_bytes = raw
            # several chunks are joined on the sender thread; one is kept as is (no list left
            # for the garbage collector while the capture waits in the queue)
            x.response_bytes = response_body[0] if len(response_body) == 1 else response_body
            x.streamed = x.response_is_sse
            x.cfg, x.allowlist = self.cfg, self.header_allowlist
            self.producer.emit(x)
        except Exception:  # never into the request path
            self.producer._stats.dropped["capture_error"] += 1
