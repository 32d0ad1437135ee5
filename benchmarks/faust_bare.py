"""A Faust agent that only consumes and acks: the cost of Faust's per-event path alone.

    .venv/bin/python benchmarks/faust_bare.py BOOTSTRAP TOPIC N

Run by processor_bench.py as a baseline next to the worker: no decoding, no steps, no sending.
Reads N records from TOPIC (from the start, a group of its own), then prints one JSON line
with the rate and the CPU microseconds per event of this process (all threads), both counted
from the first record in, and exits.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from typing import Any

import faust
from faust.worker import Worker

from auditpipe.broker import EMBEDDED_HEARTBEAT_INTERVAL_SECS, EMBEDDED_SESSION_TIMEOUT_SECS


def main() -> None:
    bootstrap, topic_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = faust.App(
        f"faust-bare-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{bootstrap}",
        broker_session_timeout=EMBEDDED_SESSION_TIMEOUT_SECS,
        broker_heartbeat_interval=EMBEDDED_HEARTBEAT_INTERVAL_SECS,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=tempfile.mkdtemp(prefix="faust-bare-"),
    )
    topic = app.topic(
        topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    seen = 0
    started: tuple[float, float] | None = None

    @app.agent(topic)
    async def bare(stream: Any) -> None:
        nonlocal seen, started
        async for batch in stream.noack_take(500, within=0.05):  # as the worker takes them
            if started is None:
                started = (time.perf_counter(), time.process_time())
            for event in batch:
                await stream.ack(event)
            seen += len(batch)
            if seen >= n:
                wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
                print(json.dumps({"rate": n / wall, "cpu_us_per_event": cpu / n * 1e6}))
                sys.stdout.flush()
                os._exit(0)

    worker = Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.spinner = None
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
