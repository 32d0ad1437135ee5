"""The runner's health endpoint and Prometheus metrics, on ``runner.health_port`` (or
``[metrics] port``).

- ``GET /healthz``: 200 and a JSON snapshot while the runner consumes and no partition has
  been failing longer than ``runner.unhealthy_after_secs``; 503 otherwise.
- ``GET /metrics``: auditpipe's metrics vocabulary (:mod:`auditpipe.metrics`) with
  ``stage="sink.NAME"``: ``auditpipe_events_received_total``, ``auditpipe_events_sent_total``
  (written durably), ``auditpipe_events_dropped_total{reason="step"}`` (by the sink's own
  steps), ``auditpipe_events_dead_lettered_total{reason}``, ``auditpipe_retries_total``,
  ``auditpipe_errors_total{type}``, ``auditpipe_lag{partition}``,
  ``auditpipe_paused_partitions`` and ``auditpipe_latency_seconds{op="write"}``.

Values are read from the runner at scrape time (one registry per runner), so nothing is
counted twice.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from auditpipe.metrics import Source, Stage, make_registry, serve_async


class Observed(Protocol):
    """What the endpoint reads of a runner (:class:`~auditpipe.sinks.runner.SinkRunner`), named
    here so that this module does not import the runner that starts it."""

    @property
    def stats(self) -> Any: ...
    @property
    def sink(self) -> Any: ...
    def lag(self) -> dict[Any, int]: ...
    def snapshot(self) -> dict[str, Any]: ...
    def healthy(self) -> tuple[bool, str]: ...


def runner_stage(runner: Observed) -> Source:
    """A sink runner's counters as the stage ``sink.NAME``."""

    def read() -> list[Stage]:
        s = runner.stats
        return [
            Stage(
                f"sink.{runner.sink.name}",
                received=s.received,
                sent=s.written,
                retries=s.retried,
                dropped={"step": s.dropped},
                dead_lettered=dict(s.dead_reasons),
                errors=dict(s.errors),
                lag={f"{tp.topic}[{tp.partition}]": n for tp, n in runner.lag().items()},
                gauges={"auditpipe_paused_partitions": float(len(runner.snapshot()["paused"]))},
                latency={"write": s.write_latency.snapshot()},
            )
        ]

    return read


def _registry(runner: Observed) -> Any:
    return make_registry(runner_stage(runner))[0]


async def serve_health(runner: Observed, host: str, port: int) -> asyncio.Server:
    """Start the endpoint (``port`` 0 = any free port); the caller closes the server."""

    def health() -> tuple[bool, dict[str, Any]]:
        ok, reason = runner.healthy()
        return ok, {"status": reason, **runner.snapshot()}

    return await serve_async(_registry(runner), host, port, health)
