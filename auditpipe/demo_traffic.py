"""``auditpipe demo``: the demo server with the audit hook, driven by the official openai client.

What ``auditpipe dev`` runs in front of its embedded pipeline, on its own: for a deployment
(docker-compose's ``demo`` profile) that has Kafka, processors and sinks running elsewhere.
Events go where ``[producer]`` says (``[kafka] raw_topic``, or stdout with
``transport = "stdout"``).
"""

from __future__ import annotations

import asyncio
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
    from auditpipe.producer import AuditProducer

    from .demo import serving_demo

    producer = AuditProducer(settings).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serving_demo(producer, options.host, options.port) as port:
            progress(f"demo server on http://{options.host}:{port}/v1 with the audit hook")
            return await _send(port, options, stop)
    finally:
        await producer.astop()
        stats = producer.stats()
        progress(f"producer: emitted={stats['emitted']} sent={stats['sent']}")


async def _send(port: int, options: DemoOptions, stop: asyncio.Event) -> int:
    """Traffic to the demo server (none: wait for a signal); 130 when interrupted."""
    from .dev import DevOptions, _traffic

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
