"""What the metrics cost: the request wrapper on the request path, and one scrape.

    .venv/bin/python benchmarks/metrics_bench.py [--requests 20000] [--rounds 5]

Same run, same process, no network:

- ``request_ns``: one HTTP request through a trivial ASGI app called directly (the baseline),
  and through ``RequestMetrics`` around it (what ``auditpipe proxy`` and ``serve`` add per
  request); the difference is the wrapper's cost;
- ``scrape_us``: rendering ``/metrics`` of a producer stage plus a sink stage with 12 lagging
  partitions and a few error types (what Prometheus pays per scrape; nothing is counted on the
  request path).

Prints JSON: medians over ``--rounds`` and the ratio wrapped / bare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from auditpipe.metrics import Latency, RequestMetrics, Stage, exposition, make_registry

START = {"type": "http.response.start", "status": 200, "headers": []}
BODY = {"type": "http.response.body", "body": b"ok"}
SCOPE = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send(START)
    await send(BODY)


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _send(message: Any) -> None:
    pass


async def per_request_ns(target: Any, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        await target(SCOPE, _receive, _send)
    return (time.perf_counter_ns() - start) / n


def scrape_us(rounds: int) -> float:
    lat = Latency()
    for i in range(1000):
        lat.observe(i / 1000)
    stage = Stage(
        "sink.postgres",
        received=10**6,
        sent=10**6,
        retries=3,
        dropped={"step": 5},
        dead_lettered={"rejected": 2, "bad_magic": 1},
        errors={"OperationalError": 3, "TimeoutError": 1},
        lag={f"auditpipe.events[{p}]": p * 10 for p in range(12)},
        gauges={"auditpipe_paused_partitions": 0.0},
        latency={"write": lat.snapshot()},
    )
    producer = Stage("producer", received=10**6, sent=10**6, latency={"send": lat.snapshot()})
    registry, _ = make_registry(lambda: [stage, producer])
    times = []
    for _ in range(rounds * 20):
        t = time.perf_counter()
        exposition(registry)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    wrapped = RequestMetrics(app, "proxy")
    bare_runs, wrapped_runs = [], []
    for _ in range(args.rounds):  # alternate, so drift hits both alike
        bare_runs.append(asyncio.run(per_request_ns(app, args.requests)))
        wrapped_runs.append(asyncio.run(per_request_ns(wrapped, args.requests)))
    bare, with_metrics = statistics.median(bare_runs), statistics.median(wrapped_runs)
    print(
        json.dumps(
            {
                "request_ns": {
                    "bare_app": round(bare),
                    "with_request_metrics": round(with_metrics),
                },
                "added_ns_per_request": round(with_metrics - bare),
                "ratios": {"wrapped_over_bare": round(with_metrics / bare, 2)},
                "scrape_us": round(scrape_us(args.rounds), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
