"""AuditMiddleware: an ASGI middleware that captures stored inference calls.

This first version captures non-streaming JSON ``POST`` requests to the configured paths
(default ``/v1/chat/completions``) whose body says ``"store": true``. The request and response
pass through untouched; the body bytes are only observed. Capture work (JSON parsing, building
the event) runs after the response was sent, and any failure in it is counted, never raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson
from auditpipe.schemas import Event, new_event

from ._producer import AuditProducer

log = logging.getLogger("auditpipe.producer")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_PATHS = ("/v1/chat/completions",)
DEFAULT_HEADER_ALLOWLIST = frozenset({"user-agent", "content-type", "x-request-id"})


class AuditMiddleware:
    """Wrap ``app``; emit one AuditEvent per captured exchange to ``producer``."""

    def __init__(
        self,
        app: ASGIApp,
        producer: AuditProducer,
        *,
        paths: Iterable[str] = DEFAULT_PATHS,
        header_allowlist: Iterable[str] = DEFAULT_HEADER_ALLOWLIST,
    ) -> None:
        self.app = app
        self.producer = producer
        self.paths = frozenset(paths)
        self.header_allowlist = frozenset(h.lower() for h in header_allowlist)
        self.capture_errors = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in self.paths
        ):
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        ts_ms = time.time_ns() // 1_000_000
        request_body: list[bytes] = []
        response_body: list[bytes] = []
        response: dict[str, Any] = {"status": None, "headers": (), "first_byte": None}

        async def observe_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                request_body.append(message.get("body", b""))
            return message

        async def observe_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = message.get("headers", ())
            elif kind == "http.response.body":
                if response["first_byte"] is None:
                    response["first_byte"] = time.perf_counter()
                response_body.append(message.get("body", b""))
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, observe_receive, observe_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                event = self._build_event(
                    scope, request_body, response_body, response, error, started, ts_ms
                )
                if event is not None:
                    self.producer.emit(event)
            except Exception:
                self.capture_errors += 1
                log.debug("could not build audit event", exc_info=True)

    def _build_event(
        self,
        scope: Scope,
        request_body: list[bytes],
        response_body: list[bytes],
        response: dict[str, Any],
        error: BaseException | None,
        started: float,
        ts_ms: int,
    ) -> Event | None:
        raw = b"".join(request_body)
        if b'"store"' not in raw:  # cheap pre-check before parsing
            return None
        body = orjson.loads(raw)
        if not isinstance(body, dict) or body.get("store") is not True or body.get("stream"):
            return None
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())
        }
        output: Any = None
        content_type = _header(response["headers"], b"content-type")
        if content_type.startswith("application/json") and response_body:
            output = orjson.loads(b"".join(response_body))
        usage = output.get("usage") if isinstance(output, dict) else None
        status = response["status"]
        err = None
        if error is not None:
            err = {"type": type(error).__name__, "message": str(error)[:2048]}
        elif status is not None and status >= 400:
            err = _error_from_body(output, status)
        metadata = body.get("metadata")
        now = time.perf_counter()
        first = response["first_byte"]
        return new_event(
            request_id=headers.get("x-request-id")
            or (output.get("id") if isinstance(output, dict) and output.get("id") else None)
            or _fallback_id(),
            ts_ms=ts_ms,
            endpoint=scope["path"],
            method="POST",
            status_code=status if status is not None else (500 if error else None),
            model=(output.get("model") if isinstance(output, dict) else None) or body.get("model"),
            store=True,
            stream=False,
            metadata={str(k): str(v) for k, v in metadata.items()}
            if isinstance(metadata, dict)
            else {},
            headers={k: v for k, v in headers.items() if k in self.header_allowlist},
            input=body,
            output=output,
            usage=_usage(usage),
            error=err,
            latency_ms=round((now - started) * 1000, 3),
            ttft_ms=round((first - started) * 1000, 3) if first is not None else None,
        )


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1").lower()
    return ""


def _usage(usage: Any) -> dict[str, int | None] | None:
    if not isinstance(usage, dict):
        return None
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: usage[k] if isinstance(usage.get(k), int) else None for k in keys}


def _error_from_body(output: Any, status: int) -> dict[str, str]:
    if isinstance(output, dict) and isinstance(output.get("error"), dict):
        e = output["error"]
        return {"type": str(e.get("type") or f"http_{status}"), "message": str(e.get("message"))}
    return {"type": f"http_{status}", "message": ""}


def _fallback_id() -> str:
    from auditpipe.schemas import new_event_id

    return new_event_id()
