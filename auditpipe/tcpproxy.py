"""A small TCP proxy (asyncio, in a thread) whose link can be cut and restored.

Used to take Kafka away from its clients without restarting the broker (the in-memory broker
loses every topic on restart): by the fault tests and by ``auditpipe soak``. While cut, open
connections are aborted and new ones are closed as soon as they are accepted. The counters
(``cuts``, ``aborted``, ``refused``) show that a cut really happened and that clients noticed.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any

from auditpipe.broker import free_port


class TcpProxy:
    def __init__(
        self,
        upstream_port: int,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        upstream_host: str = "127.0.0.1",
    ) -> None:
        """``ssl_context``: terminate TLS with it (a TLS listener in front of a plain broker).
        ``upstream_host``: where the upstream listens (default loopback)."""
        self.upstream_port = upstream_port
        self.ssl_context = ssl_context
        self.upstream_host = upstream_host
        self.port = port or free_port()
        self.cut_active = False
        self.connections = 0
        self.cuts = 0  # cut() calls
        self.aborted = 0  # open connections aborted by a cut
        self.refused = 0  # connections accepted and closed at once while cut
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._started = threading.Event()

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.ssl_context
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_active:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.cut_active:
                        break
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        """Abort every open connection and refuse new ones until restore()."""

        def _cut() -> None:
            self.cut_active = True
            self.cuts += 1
            self.aborted += len(self._writers) // 2
            for w in list(self._writers):
                w.transport.abort()

        self._loop.call_soon_threadsafe(_cut)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "cut_active", False)

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            me = asyncio.current_task()
            handlers = [t for t in asyncio.all_tasks() if t is not me]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
