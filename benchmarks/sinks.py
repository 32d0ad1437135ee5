"""Sink throughput on ~2 KB events, with a discarding sink as the same-run baseline.

Two measurements per sink, each repeated ``--repeat`` times (the median is reported):

- ``write``: ``sink.write`` called on pre-built batches of ``--batch`` events (one partition),
  i.e. the sink's own cost: serialisation, compression, the store round trips, fsync.
- ``runner``: the whole consumer path. ``--events`` events are produced to a topic on the
  embedded broker first; the clock starts at the first record the runner receives (the group
  join is excluded) and stops when the last one is written and committed.

Stores: files in a temp dir (fsync per batch), a moto S3 server in a subprocess over HTTP,
PostgreSQL at ``--pg-dsn`` (default: the machine's, a fresh schema dropped afterwards).
MongoDB is not measured: only a wire-level mock is available here.

    .venv/bin/python benchmarks/sinks.py                 # prints one JSON document
    .venv/bin/python benchmarks/sinks.py --sinks file,s3 --events 20000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

from auditpipe.schemas import Event, encode, new_event
from auditpipe.sinks import Batch, Sink, load_sink_class
from auditpipe.sinks.runner import SinkRunner

from auditpipe.broker import EmbeddedBroker
from auditpipe.kafka import ensure_topics
from auditpipe.settings import RunnerSettings, Settings, load_settings

TARGETS = {"file": 50_000, "s3": 20_000, "postgres": 10_000}


class DiscardSink(Sink):
    name = "discard"

    async def write(self, batch: Sequence[Event]) -> None:
        return None


def make_events(n: int) -> list[Event]:
    text = "x" * 1100
    return [
        new_event(
            request_id=f"r{i}",
            model="m",
            endpoint="/v1/chat/completions",
            status_code=200,
            metadata={"ticket": f"T-{i % 7}"},
            input={"model": "m", "messages": [{"role": "user", "content": f"q{i} {text}"}]},
            output={"model": "m", "choices": [{"message": {"role": "assistant", "content": "a"}}]},
            usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            latency_ms=12.5,
        )
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stores:
    """Starts what the chosen sinks need and builds a fresh sink per run."""

    def __init__(self, sinks: list[str], pg_dsn: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix="auditpipe-bench-")
        self.pg_dsn = pg_dsn
        self.schemas: list[str] = []
        self.moto: subprocess.Popen[bytes] | None = None
        if "s3" in sinks:
            port = free_port()
            exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
            self.moto = subprocess.Popen(
                [exe, "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self.s3_endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("moto_server did not start") from None
                    time.sleep(0.1)

    def make(self, name: str) -> Sink:
        if name == "discard":
            return DiscardSink()
        run = uuid.uuid4().hex[:8]
        if name == "file":
            path = os.path.join(self.tmp, run, "events.jsonl")
            return load_sink_class("file").from_mapping({"path": path, "max_bytes": 64 << 20})
        if name == "s3":
            import boto3

            bucket = f"bench-{run}"
            boto3.client(
                "s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                aws_access_key_id="k", aws_secret_access_key="s",
            ).create_bucket(Bucket=bucket)  # fmt: skip
            return load_sink_class("s3").from_mapping({
                "bucket": bucket, "endpoint_url": self.s3_endpoint, "path_style": True,
                "region": "us-east-1", "access_key_id": "k", "secret_access_key": "s",
            })  # fmt: skip
        if name == "postgres":
            schema = f"bench_{run}"
            self.schemas.append(schema)
            return load_sink_class("postgres").from_mapping(
                {"dsn": self.pg_dsn, "schema_name": schema, "auto_migrate": True}
            )
        raise SystemExit(f"unknown sink {name}")

    def close(self) -> None:
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(10)
        if self.schemas:
            import psycopg

            with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
                for schema in self.schemas:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(self.tmp, ignore_errors=True)


async def bench_write(sink: Sink, events: list[Event], batch: int) -> float:
    await sink.start()
    try:
        batches = [
            Batch(events[i : i + batch], "bench", 0, list(range(i, i + len(events[i : i + batch]))))
            for i in range(0, len(events), batch)
        ]
        start = time.perf_counter()
        for b in batches:
            await sink.write(b)
        elapsed = time.perf_counter() - start
    finally:
        await sink.stop()
    return len(events) / elapsed


async def bench_runner(sink: Sink, settings: Settings, n: int) -> float:
    runner = SinkRunner(sink, settings)
    task = asyncio.create_task(runner.run())
    try:
        while runner.stats.received == 0:
            if task.done():
                task.result()
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        while runner.stats.written < n:
            if task.done():
                task.result()
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - start
    finally:
        runner.stop()
        await task
    return n / elapsed


async def produce_all(settings: Settings, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=5,
        max_batch_size=1 << 20,
    )  # fmt: skip
    await producer.start()
    try:
        futures = [await producer.send(settings.kafka.events_topic, v) for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(samples)), "samples": [round(x) for x in samples]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sinks", default="file,s3,postgres")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=RunnerSettings().max_events)  # the default
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--no-runner", action="store_true", help="skip the end-to-end runs")
    args = ap.parse_args()
    sinks = ["discard", *[s for s in args.sinks.split(",") if s]]
    events = make_events(args.events)
    sizes = [len(json.dumps(e)) for e in events[:100]]
    stores = Stores(sinks, args.pg_dsn)
    result: dict[str, Any] = {
        "benchmark": "sinks",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "events": args.events,
        "event_json_bytes": round(statistics.mean(sizes)),
        "batch": args.batch,
        "repeat": args.repeat,
        "write": {},
        "runner": {},
    }
    try:
        for name in sinks:
            samples = [
                asyncio.run(bench_write(stores.make(name), events, args.batch))
                for _ in range(args.repeat)
            ]
            result["write"][name] = summary(samples)
        if not args.no_runner:
            values = [encode(e) for e in events]
            with EmbeddedBroker() as broker:
                for name in sinks:
                    samples = []
                    for _ in range(args.repeat):
                        suffix = uuid.uuid4().hex[:8]
                        base = load_settings(env={})
                        s = base.model_copy(update={
                            "kafka": base.kafka.model_copy(update={
                                "bootstrap": broker.bootstrap, "partitions": 1,
                                "raw_topic": f"b-{suffix}.raw",
                                "events_topic": f"b-{suffix}.events",
                                "dlq_topic": f"b-{suffix}.dlq",
                            }),
                            "runner": base.runner.model_copy(update={
                                "group_prefix": f"b-{suffix}-", "max_events": args.batch,
                                "session_timeout_secs": 2.0, "heartbeat_interval_secs": 0.5,
                            }),
                        })  # fmt: skip
                        asyncio.run(ensure_topics(s.kafka))
                        asyncio.run(produce_all(s, values))
                        samples.append(asyncio.run(bench_runner(stores.make(name), s, len(values))))
                    result["runner"][name] = summary(samples)
    finally:
        stores.close()
    # The discard baseline is a ratio base only end to end: alone, its write() costs nothing.
    for kind in ("write", "runner"):
        base = result[kind].get("discard", {}).get("median")
        for name, entry in result[kind].items():
            if base and name != "discard" and kind == "runner":
                entry["ratio_to_discard"] = round(entry["median"] / base, 3)
            if name in TARGETS:
                entry["target"] = TARGETS[name]
                entry["meets_target"] = entry["median"] >= TARGETS[name]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
