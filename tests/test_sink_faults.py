"""Crash tests: `auditpipe sink NAME` killed with SIGKILL mid-stream, then restarted.

Every event must then be stored exactly once (by event_id): in PostgreSQL (primary key, so
this proves nothing is lost) and in S3's objects (where a duplicate would show, so this proves
that a redelivered batch overwrites the objects of the batch the killed process wrote but
never committed). The restarted process is stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg

from auditpipe.settings import Settings

from .sinkfixtures import MotoS3
from .sinkutil import committed, make_events, produce_events

N = 3000


def write_config(path: Path, settings: Settings, sink: str, table: dict[str, Any]) -> Path:
    k = settings.kafka
    lines = [
        "[kafka]",
        f'bootstrap = "{k.bootstrap}"',
        f'raw_topic = "{k.raw_topic}"',
        f'events_topic = "{k.events_topic}"',
        f'dlq_topic = "{k.dlq_topic}"',
        f"partitions = {k.partitions}",
        "[runner]",
        f'group_prefix = "{settings.runner.group_prefix}"',
        "session_timeout_secs = 2.0",
        "heartbeat_interval_secs = 0.5",
        "max_events = 100",
        "max_wait_secs = 0.05",
        "backoff_initial_secs = 0.05",
        f"[sinks.{sink}]",
        *(f"{key} = {orjson.dumps(value).decode()}" for key, value in table.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_sink(sink: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "sink", sink, "--config", str(config)],
            stdout=fh, stderr=fh, env=env,
        )  # fmt: skip


def wait_committed(settings: Settings, group: str, at_least: int, proc: Any, log: Path) -> int:
    deadline = time.monotonic() + 90
    while True:
        done = asyncio.run(committed(settings, group))
        if done >= at_least:
            return done
        assert proc.poll() is None, f"sink exited {proc.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"committed {done} < {at_least}: {log.read_text()}"
        time.sleep(0.1)


def crash_and_recover(settings: Settings, sink: str, config: Path, tmp_path: Path) -> None:
    group = f"{settings.runner.group_prefix}{sink}"
    log = tmp_path / "sink.log"
    asyncio.run(produce_events(settings, make_events(N, size=1000)))
    first = start_sink(sink, config, log)
    try:
        wait_committed(settings, group, 300, first, log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert asyncio.run(committed(settings, group)) < N, "killed before the end (mid-stream)"
    second = start_sink(sink, config, log)
    try:
        wait_committed(settings, group, N, second, log)
    finally:
        second.send_signal(signal.SIGTERM)
        code = second.wait(30)
    assert code == 0, f"SIGTERM should exit cleanly: {log.read_text()[-2000:]}"


class TestKillDashNine:
    def test_postgres_every_event_once_after_sigkill(
        self, settings: Settings, pg_dsn: str, tmp_path: Path
    ) -> None:
        schema = f"k_{uuid.uuid4().hex[:10]}"
        table = {"dsn": pg_dsn, "schema_name": schema, "auto_migrate": True}
        config = write_config(tmp_path / "pg.toml", settings, "postgres", table)
        crash_and_recover(settings, "postgres", config, tmp_path)
        with psycopg.connect(pg_dsn) as conn:
            total, distinct = conn.execute(
                f'SELECT count(*), count(DISTINCT id) FROM "{schema}".requests'
            ).fetchone() or (0, 0)
        assert total == distinct == N

    def test_s3_every_event_once_after_sigkill(
        self, settings: Settings, moto_s3: MotoS3, tmp_path: Path
    ) -> None:
        bucket = moto_s3.new_bucket()
        config = write_config(tmp_path / "s3.toml", settings, "s3", moto_s3.sink_config(bucket))
        crash_and_recover(settings, "s3", config, tmp_path)
        client: Any = moto_s3.client()
        ids: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                ids += [orjson.loads(x)["event_id"] for x in gzip.decompress(body).splitlines()]
        assert len(ids) == N, f"{len(ids) - len(set(ids))} duplicate(s), {N - len(set(ids))} lost"
        assert len(set(ids)) == N
