"""The auditing reverse proxy: ``auditpipe proxy --upstream URL`` in front of any HTTP server.

:class:`ProxyApp` is an ASGI app that forwards every request to the upstream server with
aiohttp's client (a pooled connector: keep-alive, a connection limit, connect/read/pool timeouts)
and streams the answer back as it comes. (httpx was tried first: its connection pool scans every
pooled connection with a poll() per request, which held the proxy to a quarter of the
throughput; benchmarks/proxy_bench.py.) Capture is not the proxy's business: the
CLI wraps it in :class:`~auditpipe.producer.AuditMiddleware`, so gating by ``store``, the header
allowlist, credentials never recorded, ``x-request-id``, stream assembly with TTFT and the size
caps are the very code that serves in-process servers.

What is forwarded unchanged, both ways: method, path and query (the raw bytes), status, headers
(repeated ones too, in order), bodies (streamed chunk by chunk; compressed bodies stay
compressed), SSE events as they arrive. What a proxy must change, it changes:

- hop-by-hop headers (``connection`` and the headers it names, ``keep-alive``,
  ``transfer-encoding``, ``te``, ``trailer``, ``upgrade``, ``proxy-*``) and ``expect`` are not
  forwarded; each side frames its own connection (``content-length`` is kept);
- ``Host`` names the upstream (``preserve_host`` keeps the client's); ``X-Forwarded-For``,
  ``-Proto`` and ``-Host`` are added (``forwarded_headers``);
- a captured request that came without ``x-request-id`` is sent upstream with the id it is
  recorded under (and the client gets it back);
- no cookie jar, no redirects followed, no headers of the client library's own, no proxy or
  ``.netrc`` settings from the environment: the upstream sees the client's credentials and
  nothing else.

Failures: the upstream unreachable -> 502, no connection within the connect/pool timeouts or
no answer within ``read_timeout_secs`` -> 504, each with an OpenAI-shaped error body (the
middleware records it).
The upstream failing after the answer started -> the client's connection is cut (a truncated
answer must not look complete) and :class:`UpstreamError` is raised (the event records it). A
client that disconnects cancels the upstream request: the upstream connection is closed, so
the server sees the disconnect and can stop generating.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from auditpipe.settings import ProxySettings

from ._middleware import REQUEST_ID_SCOPE_KEY

log = logging.getLogger("auditpipe.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Not forwarded in either direction (RFC 9110 section 7.6.1, plus the legacy names).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_NOT_FORWARDED_UP = HOP_BY_HOP | {b"expect"}  # 100-continue is answered by our own server

_LOG_EVERY_SECS = 10.0


class UpstreamError(Exception):
    """The upstream failed after the response had started (the client's answer is cut)."""


class _ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


class ProxyApp:
    """ASGI app forwarding everything to ``upstream``; see the module docstring.

    ``stats``: requests forwarded, upstream failures by kind, client disconnects.
    """

    def __init__(self, upstream: str, cfg: ProxySettings | None = None) -> None:
        self.cfg = cfg or ProxySettings(upstream=upstream)
        base = URL(upstream)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"upstream {upstream!r} is not an http:// or https:// URL")
        self.upstream = upstream
        self._origin = str(base.origin())
        self._prefix = base.raw_path.rstrip("/")
        self._authority = (base.raw_authority or base.host).encode("idna")
        self._session: aiohttp.ClientSession | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self._last_log: dict[str, float] = {}

    def _open_session(self) -> aiohttp.ClientSession:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(
            limit=cfg.max_connections,
            keepalive_timeout=cfg.keepalive_expiry_secs,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=cfg.pool_timeout_secs + cfg.connect_timeout_secs,
                sock_connect=cfg.connect_timeout_secs,
                sock_read=cfg.read_timeout_secs,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            auto_decompress=False,
            trust_env=False,
            read_bufsize=2**16,
            max_line_size=65536,
            max_field_size=65536,
            max_headers=1024,
        )
        return self._session

    async def aclose(self) -> None:
        """Close the upstream connections (the app's lifespan shutdown does it)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._forward(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # not proxied (yet): refuse the handshake
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- one exchange --------------------------------------------------------------------------

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats["requests"] += 1
        session = self._session or self._open_session()
        first = await receive()
        if first["type"] == "http.disconnect":
            self.stats["client_disconnects"] += 1
            return
        task = asyncio.current_task()
        assert task is not None
        watch = _DisconnectWatch(receive, task)
        headers, has_length = self._request_headers(scope)
        data: bytes | AsyncIterator[bytes] | None
        if first.get("more_body", False):
            data = self._stream_body(first.get("body", b""), receive, watch)
        else:
            data = first.get("body", b"") or (b"" if has_length else None)
            watch.start()
        response: aiohttp.ClientResponse | None = None
        try:
            try:
                response = await session.request(
                    scope["method"], self._url(scope), headers=headers, data=data,
                    allow_redirects=False, compress=None, chunked=None,
                )  # fmt: skip
            except (aiohttp.ClientError, TimeoutError) as exc:
                await self._answer_failure(send, exc)
                return
            await self._relay(response, send, watch)
        except _ClientGone:
            self.stats["client_disconnects"] += 1
        except asyncio.CancelledError:
            if watch.fired and task.uncancel() == 0:  # our own cancel: the client went away
                self.stats["client_disconnects"] += 1
                return
            raise
        finally:
            watch.stop()
            if response is not None:
                if watch.done and response.content.at_eof():
                    response.release()  # read to the end: the connection is reused
                else:
                    response.close()  # mid-body: closed, so the upstream sees the client leave

    async def _relay(
        self, response: aiohttp.ClientResponse, send: Send, watch: _DisconnectWatch
    ) -> None:
        await send({"type": "http.response.start", "status": response.status,
                    "headers": _response_headers(response.raw_headers)})  # fmt: skip
        expected = response.content_length if response.content_length is not None else -1
        sent = 0
        try:
            # raw bytes: content-encoding is passed through; read to the end even after the
            # last announced byte, so the connection goes back to the pool
            async for chunk in response.content.iter_any():
                if not chunk or watch.done:
                    continue
                sent += len(chunk)
                if sent == expected:  # the last chunk ends the response itself
                    watch.done = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = _failure(exc)[0]
            self._count_failure(f"{kind}_mid_response", exc)
            raise UpstreamError(
                f"upstream failed after the response started: {type(exc).__name__}: {exc}"
            ) from exc
        if not watch.done:
            watch.done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream_body(
        self, first: bytes, receive: Receive, watch: _DisconnectWatch
    ) -> AsyncIterator[bytes]:
        """The request body as it arrives; then the disconnect watch takes over receive()."""
        if first:
            yield first
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                break
        watch.start()

    def _url(self, scope: Scope) -> URL:
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else quote(scope["path"])
        query = scope.get("query_string") or b""
        target = self._origin + self._prefix + path
        if query:
            target += "?" + query.decode("latin-1")
        return URL(target, encoded=True)

    def _request_headers(self, scope: Scope) -> tuple[list[tuple[str, str]], bool]:
        """(headers for the upstream, whether the client sent content-length)."""
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = _NOT_FORWARDED_UP
        for name, value in raw:
            if name == b"connection":  # and the headers it names
                drop = drop | {t.strip().lower() for t in value.split(b",")}
        cfg = self.cfg
        out: list[tuple[str, str]] = []
        host = forwarded_for = None
        has_id = has_proto = has_fhost = has_length = False
        for name, value in raw:
            if name in drop:
                continue
            if name == b"host":
                host = value
                if not cfg.preserve_host:
                    continue
            elif name == b"x-forwarded-for":
                forwarded_for = value
                continue
            elif name == b"content-length":
                has_length = True
            elif name == b"x-request-id":
                has_id = True
            elif name == b"x-forwarded-proto":
                has_proto = True
            elif name == b"x-forwarded-host":
                has_fhost = True
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        if not cfg.preserve_host or host is None:
            out.append(("host", self._authority.decode("latin-1")))
        if not has_id:
            rid = scope.get(REQUEST_ID_SCOPE_KEY)
            if rid:
                out.append(("x-request-id", rid))
        if cfg.forwarded_headers:
            client = scope.get("client")
            if client:
                addr = str(client[0]).encode("latin-1")
                forwarded_for = forwarded_for + b", " + addr if forwarded_for else addr
            if not has_proto:
                out.append(("x-forwarded-proto", scope.get("scheme", "http")))
            if not has_fhost and host is not None:
                out.append(("x-forwarded-host", host.decode("latin-1")))
        if forwarded_for is not None:
            out.append(("x-forwarded-for", forwarded_for.decode("latin-1")))
        return out, has_length

    async def _answer_failure(self, send: Send, exc: BaseException) -> None:
        kind, status, message = _failure(exc)
        self._count_failure(kind, exc)
        body = orjson.dumps(
            {"error": {"message": message, "type": "upstream_error", "param": None, "code": kind}}
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _count_failure(self, kind: str, exc: BaseException) -> None:
        self.stats[kind] += 1
        now = time.monotonic()
        if now - self._last_log.get(kind, -_LOG_EVERY_SECS) >= _LOG_EVERY_SECS:
            self._last_log[kind] = now  # one line per kind every 10 s, the rest are counted
            log.warning("upstream %s (%s): %s: %s [%d so far]", self.upstream, kind,
                        type(exc).__name__, exc, self.stats[kind])  # fmt: skip


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out = [(name.lower(), value) for name, value in raw]
    drop = HOP_BY_HOP
    for name, value in out:
        if name == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",")}
    return [(name, value) for name, value in out if name not in drop]


def _failure(exc: BaseException) -> tuple[str, int, str]:
    """(counter name and error code, status for the client, message) of an upstream failure."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "upstream_connect_timeout", 504, "auditpipe proxy: no upstream connection in time"
    if isinstance(exc, TimeoutError):  # sock_read: no answer, or no next chunk, in time
        return "upstream_timeout", 504, "auditpipe proxy: the upstream did not answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "upstream_unreachable", 502, "auditpipe proxy: the upstream is unreachable"
    return "upstream_failed", 502, f"auditpipe proxy: the upstream failed ({type(exc).__name__})"


class _DisconnectWatch:
    """Once the request body is in, wait for ``http.disconnect`` and cancel the exchange's
    task, which closes the upstream connection. ``done`` is set before the response's last
    body is sent: servers report a disconnect once a response is complete, too."""

    __slots__ = ("_future", "_receive", "_task", "done", "fired")

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self._receive = receive
        self._task = task
        self._future: asyncio.Future[None] | None = None
        self.done = False
        self.fired = False

    def start(self) -> None:
        self._future = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.fired = True
                    self._task.cancel()
                return

    def stop(self) -> None:
        if self._future is not None:
            self._future.cancel()
