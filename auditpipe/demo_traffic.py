"""``auditpipe demo``: the demo server with the audit hook, driven by the official openai client.

What ``auditpipe dev`` runs in front of its embedded pipeline, on its own: for a deployment
(docker-compose's ``demo`` profile) that has Kafka, processors and sinks running elsewhere.
Events go where ``[producer]`` says (``[kafka] raw_topic``, or stdout with
``transport = "stdout"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass

from .settings import Settings


@dataclass
class DemoOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    requests: int | None = None  # None: rate_per_sec until SIGTERM; 0: serve, send nothing
    rate_per_sec: float = 1.0
    concurrency: int = 4


def progress(message: str) -> None:
    print(f"[auditpipe demo] {message}", file=sys.stderr, flush=True)


async def run_demo(settings: Settings, options: DemoOptions) -> int:
    """Serve the demo app with AuditMiddleware; send traffic; flush the producer; return."""
    import uvicorn

    from auditpipe.producer import AuditMiddleware, AuditProducer

    from .demo import create_demo_app
    from .dev import DevOptions, _traffic

    producer = AuditProducer(settings).start()
    server = uvicorn.Server(
        uvicorn.Config(
            AuditMiddleware(create_demo_app(), producer),
            host=options.host,
            port=options.port,
            log_level="warning",
            lifespan="off",
        )
    )
    server_task = asyncio.create_task(server.serve(), name="demo-server")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not server.started:
            if server_task.done():
                server_task.result()
                raise RuntimeError("demo server exited during start-up")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else options.port
        progress(f"demo server on http://{options.host}:{port}/v1 with the audit hook")
        if options.requests == 0:
            await stop.wait()
            return 0
        traffic = DevOptions(
            sink="-",
            requests=options.requests,
            timeout_secs=0,
            concurrency=options.concurrency,
            port=port,
            rate_per_sec=options.rate_per_sec,
            config_path=None,
            origin="demo",
        )
        await _traffic(port, traffic, stop)
        return 130 if stop.is_set() else 0
    finally:
        await producer.astop()
        stats = producer.stats()
        progress(f"producer: emitted={stats['emitted']} sent={stats['sent']}")
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server_task, 5)
