"""The runner's health endpoint and Prometheus metrics, on ``runner.health_port``.

- ``GET /healthz``: 200 and a JSON snapshot while the runner consumes and no partition has
  been failing longer than ``runner.unhealthy_after_secs``; 503 otherwise.
- ``GET /metrics``: Prometheus text. Counters ``auditpipe_sink_received_total``,
  ``..._written_total``, ``..._retried_total``, ``..._dead_lettered_total``,
  ``..._dropped_total`` (by the sink's own steps),
  ``..._errors_total{error}``; gauges ``auditpipe_sink_lag{partition}`` and
  ``auditpipe_sink_paused_partitions``. Every series carries ``sink``.

Values are read from the runner at scrape time (one registry per runner), so nothing is
counted twice. Needs ``prometheus-client`` (extra ``metrics``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

from auditpipe.errors import ConfigError

if TYPE_CHECKING:
    from .runner import SinkRunner


def _registry(runner: SinkRunner) -> Any:
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        raise ConfigError(
            "runner.health_port needs prometheus-client: pip install 'auditpipe[metrics]'"
        ) from None

    class RunnerCollector:
        def collect(self) -> Iterator[Any]:
            s, name = runner.stats, runner.sink.name
            for metric, value, doc in (
                ("received", s.received, "records consumed from Kafka"),
                ("written", s.written, "events durably written by the sink"),
                ("retried", s.retried, "failed write attempts that will be retried"),
                ("dead_lettered", s.dead_lettered, "records sent to the DLQ"),
                ("dropped", s.dropped, "events the sink's own steps dropped"),
            ):
                c = CounterMetricFamily(f"auditpipe_sink_{metric}", doc, labels=["sink"])
                c.add_metric([name], value)
                yield c
            errors = CounterMetricFamily(
                "auditpipe_sink_errors", "errors by type", labels=["sink", "error"]
            )
            for error, count in s.errors.items():
                errors.add_metric([name, error], count)
            yield errors
            lag = GaugeMetricFamily(
                "auditpipe_sink_lag", "records not yet committed", labels=["sink", "partition"]
            )
            for tp, value in runner.lag().items():
                lag.add_metric([name, f"{tp.topic}[{tp.partition}]"], value)
            yield lag
            paused = GaugeMetricFamily(
                "auditpipe_sink_paused_partitions", "partitions paused by failures", labels=["sink"]
            )
            paused.add_metric([name], len(runner.snapshot()["paused"]))
            yield paused

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunnerCollector())
    return registry


async def serve_health(runner: SinkRunner, host: str, port: int) -> asyncio.Server:
    """Start the endpoint (``port`` 0 = any free port); the caller closes the server."""
    registry = _registry(runner)  # raises ConfigError without prometheus-client
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
            elif path.startswith("/healthz"):
                ok, reason = runner.healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype = "application/json"
                body = orjson.dumps({"status": reason, **runner.snapshot()})
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
