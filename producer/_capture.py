"""Capture without ASGI: a context manager and a one-shot function for any server or client.

::

    with capture(producer, "/v1/chat/completions", body, request_id=rid) as c:
        answer = handle(body)          # an exception is recorded, then propagates
        c.set_output(answer, status=200)

    record(producer, "/v1/embeddings", body, output, status=200)   # after the fact

An explicit capture is its own opt-in: it is recorded whatever ``store`` says (pass
``force=False`` to apply the same gating as the middleware). Like ``emit()``, neither ever
raises into the caller because of capture; the event is built on the producer's thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

from . import _event
from ._event import Exchange
from ._producer import AuditProducer


class Capture:
    """One exchange being captured; see :func:`capture`."""

    def __init__(
        self,
        producer: AuditProducer,
        endpoint: str,
        input: Any,
        *,
        request_id: str | None = None,
        model: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        traceparent: str | None = None,
        method: str = "POST",
        force: bool = True,
    ) -> None:
        self.producer = producer
        self._started = producer._request_seen = time.perf_counter()  # see AuditProducer._pace
        self._first: float | None = None
        self._done = False
        x = Exchange(endpoint, method, time.time_ns() // 1_000_000)
        x.request = input
        x.request_id = request_id or _event.new_request_id()
        x.model_hint = model
        x.metadata = dict(metadata) if metadata is not None else None
        x.headers = [(k.lower(), v) for k, v in (headers or {}).items()]
        x.forced = force
        x.trace_id, x.span_id = _event.current_trace()
        x.traceparent = traceparent
        self.exchange = x

    @property
    def request_id(self) -> str:
        return self.exchange.request_id

    def set_output(self, output: Any, *, status: int = 200) -> None:
        """The response (a JSON-like value, or a pydantic model) and its HTTP status."""
        self.exchange.response = output
        self.exchange.status = status
        if self._first is None:
            self._first = time.perf_counter()

    def add_chunk(self, chunk: Any) -> None:
        """One streamed chunk (dict or pydantic model); the event gets the assembled output."""
        x = self.exchange
        if x.chunks is None:
            x.chunks = []
            x.streamed = True
            self._first = time.perf_counter()
        dump = getattr(chunk, "model_dump", None)
        x.chunks.append(dump(mode="json", exclude_unset=True) if callable(dump) else chunk)

    def set_error(self, exc: BaseException, *, status: int | None = None, body: Any = None) -> None:
        x = self.exchange
        x.exc = exc
        x.status = status
        if body is not None:
            x.response = body

    def finish(self, *, incomplete: bool = False) -> bool:
        """Emit the event (once). Returns what ``emit()`` returned."""
        if self._done:
            return False
        self._done = True
        try:
            x = self.exchange
            now = self.producer._request_seen = time.perf_counter()
            x.incomplete = x.incomplete or incomplete
            x.latency_ms = round((now - self._started) * 1000, 3)
            if self._first is not None:
                x.ttft_ms = round((self._first - self._started) * 1000, 3)
            if x.status is None and x.exc is None:
                x.status = 200
            cfg = self.producer.settings.producer
            allow = frozenset(h.lower() for h in cfg.header_allowlist)
            return self.producer.emit(partial(_event.build, x, cfg, allow))
        except Exception:
            return False


@contextmanager
def capture(producer: AuditProducer, endpoint: str, input: Any, **kwargs: Any) -> Iterator[Capture]:
    """Capture one exchange around a block (see the module docstring)."""
    cap = Capture(producer, endpoint, input, **kwargs)
    try:
        yield cap
    except BaseException as exc:
        if cap.exchange.exc is None:
            cap.set_error(exc, status=getattr(exc, "status_code", None))
        cap.finish(incomplete=True)
        raise
    cap.finish()


def record(
    producer: AuditProducer,
    endpoint: str,
    input: Any,
    output: Any,
    *,
    status: int = 200,
    **kwargs: Any,
) -> bool:
    """Capture an exchange that already happened. Returns False when it was dropped."""
    try:
        cap = Capture(producer, endpoint, input, **kwargs)
        cap.set_output(output, status=status)
        return cap.finish()
    except Exception:
        return False
