"""Serving an ASGI door (the proxy, the KServe receiver) with uvicorn around an AuditProducer.

Shared by ``auditpipe proxy`` and ``auditpipe receive``: the socket is bound first (a port in
use is a clear error, port 0 picks a free one and the address is printed), uvicorn adds no
``server``/``date`` headers of its own, SIGINT/SIGTERM stop it gracefully (requests in flight
finish), then the producer flushes (``producer.stop_timeout_secs``; with the spool, what Kafka
did not take stays on disk).
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from auditpipe.errors import AuditpipeError

from ._producer import AuditProducer


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); raises AuditpipeError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says IPPROTO_TCP (with proto 0, Nagle + delayed ACKs add ~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AuditpipeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _noted(signum: int, frame: Any) -> None:
    pass


def run(
    app: Any,
    producer: AuditProducer,
    sock: socket.socket,
    banner: str,
    *,
    on_stop: Callable[[], str] | None = None,
    registry: Any = None,
    metrics: Any = None,
) -> int:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM; ``banner`` (with ``{url}``) goes to
    stderr once listening; ``on_stop()``'s summary after the producer stopped. ``registry``
    is served on ``metrics.port`` (``[metrics]``) when that is set."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,  # auditpipe.logs formats uvicorn's records like every other
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,  # scope["client"] is the peer; the proxy adds X-Forwarded-For
        timeout_keep_alive=75,  # longer than common client pools keep idle connections
    )
    server = uvicorn.Server(config)
    metrics_server = None
    if registry is not None and metrics is not None:
        from auditpipe.metrics import serve_thread

        metrics_server = serve_thread(registry, metrics.host, metrics.port)
    producer.start()
    print(banner.format(url=url), file=sys.stderr, flush=True)
    # uvicorn re-raises the stop signal to the handler it found once it has shut down: that
    # handler must let the producer flush, not end the process
    previous = {sig: signal.signal(sig, _noted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stats = producer.stop()
        if metrics_server is not None:
            metrics_server.close()
        summary = on_stop() if on_stop is not None else ""
        print(
            f"stopped; producer: emitted={stats['emitted']} sent={stats['sent']} "
            f"spooled={stats['spooled']} dropped={stats['dropped']} {summary}".rstrip(),
            file=sys.stderr,
            flush=True,
        )
    return 0
