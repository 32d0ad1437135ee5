"""Helpers for tests that serve ASGI apps over real HTTP and read the stdout transport."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import uvicorn

from auditpipe.broker import free_port

from .conftest import wait_until


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread; yields its base URL (http://127.0.0.1:PORT)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class LineSink(io.TextIOBase):
    """A text stream for the stdout transport that keeps each JSON line, parsed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial = ""
        self.events: list[dict[str, Any]] = []

    def write(self, text: str) -> int:
        with self._lock:
            data = self._partial + text
            *lines, self._partial = data.split("\n")
            self.events.extend(orjson.loads(line) for line in lines if line)
        return len(text)

    def wait_for(self, count: int, timeout_secs: float = 10.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.events) >= count, timeout_secs, f"{count} event(s) on stdout")
        return list(self.events)


class RecordingApp:
    """ASGI wrapper that records the body bytes the wrapped app sent (before any middleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sent: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def record(message: Any) -> None:
            if message["type"] == "http.response.body":
                self.sent.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, record)
