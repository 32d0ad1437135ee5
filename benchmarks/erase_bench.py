"""Erasing one user: among N PostgreSQL rows and among M S3 objects (seconds), with baselines.

    .venv/bin/python benchmarks/erase_bench.py [--pg-rows 1000000] [--s3-objects 1000]
        [--dsn DSN] [--skip-pg] [--skip-s3]

PostgreSQL (``--dsn``, default: an embedded PostgreSQL, pgserver, in a temporary directory): a
fresh schema filled by benchmarks/bulkload.py (the sink's layout, ~1.5 KB per
record, caller metadata ``user`` with 1000 values, so one user owns N/1000 records); the
erasure is ``PostgresSink.erase(Selector("user", "u7"))`` (chunked deletes, cascade). Baseline
in the same run: ``PostgresSink.count`` of the same selector (the same scan, no deletes) and a
plain ``count(*)`` of the requests table (medians of 3).

S3: a moto server over HTTP on loopback; M objects written by ``S3Sink.write`` (jsonl.gz, 20
records each, 2 KB records; user u7 in one record of every 50th object); the erasure is
``S3Sink.erase``. Baseline in the same run: list + GET + decompress + match of every object
(``S3Sink.count``, the read the erasure cannot avoid), median of 3.

Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bulkload import bulk_load  # noqa: E402


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def median_of(n: int, fn: Any) -> tuple[float, Any]:
    runs = [timed(fn) for _ in range(n)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def bench_pg(dsn: str, rows: int) -> dict[str, Any]:
    import psycopg
    from auditpipe.sinks.postgres import PostgresSink, migration_sql

    from auditpipe.privacy.selector import Selector

    schema = f"erase_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn) as conn:
        conn.execute(migration_sql(schema))
        conn.commit()
        load_secs = bulk_load(conn, schema, rows)
    sink = PostgresSink.from_mapping({"dsn": dsn, "schema_name": schema})
    assert isinstance(sink, PostgresSink)
    selector = Selector("user", "u7")
    try:
        with psycopg.connect(dsn) as conn:
            count_all_secs, _ = median_of(
                3, lambda: conn.execute(f'SELECT count(*) FROM "{schema}".requests').fetchone()
            )
        count_secs, matched = median_of(3, lambda: asyncio.run(sink.count(selector)))
        erase_secs, result = timed(lambda: asyncio.run(sink.erase(selector)))
        again_secs, again = timed(lambda: asyncio.run(sink.erase(selector)))
        left = asyncio.run(sink.count(selector))
    finally:
        asyncio.run(sink.stop())
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return {
        "rows": rows,
        "load_secs": round(load_secs, 1),
        "matched": matched,
        "erased": result.erased,
        "left_after": left,
        "erase_secs": round(erase_secs, 3),
        "baseline_count_same_selector_secs": round(count_secs, 3),
        "baseline_count_all_rows_secs": round(count_all_secs, 3),
        "erase_over_count_ratio": round(erase_secs / count_secs, 2),
        "second_erase_noop_secs": round(again_secs, 3),
        "second_erase_erased": again.erased,
    }


def bench_s3(objects: int) -> dict[str, Any]:
    import logging

    from auditpipe.schemas import new_event
    from auditpipe.sinks import Batch
    from auditpipe.sinks.s3 import S3Sink
    from moto.server import ThreadedMotoServer

    from auditpipe.broker import free_port
    from auditpipe.privacy.selector import Selector

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        config = {
            "bucket": "erase-bench", "endpoint_url": f"http://127.0.0.1:{port}",
            "path_style": True, "access_key_id": "testing", "secret_access_key": "testing",
            "region": "us-east-1", "concurrency": 16,
        }  # fmt: skip
        sink = S3Sink.from_mapping(config)
        assert isinstance(sink, S3Sink)
        sink._ensure_client().create_bucket(Bucket="erase-bench")
        text = "x" * 1500
        ts = int(time.time() * 1000)

        async def load() -> None:
            await sink.start()
            for o in range(objects):
                events = [
                    new_event(
                        request_id=f"r{o}-{i}", endpoint="/v1/chat/completions", ts_ms=ts,
                        user="u7" if (o % 50 == 0 and i == 0) else f"u{100 + i}",
                        input={"messages": [{"role": "user", "content": text}]},
                        output={"choices": [{"message": {"content": "ok"}}]},
                    )
                    for i in range(20)
                ]  # fmt: skip
                await sink.write(Batch(events, "events", 0, range(o * 20, o * 20 + 20)))

        load_secs, _ = timed(lambda: asyncio.run(load()))
        selector = Selector("user", "u7")
        scan_secs, matched = median_of(3, lambda: asyncio.run(sink.count(selector)))
        erase_secs, result = timed(lambda: asyncio.run(sink.erase(selector)))
        again_secs, again = timed(lambda: asyncio.run(sink.erase(selector)))
        asyncio.run(sink.stop())
    finally:
        server.stop()
    return {
        "objects": objects,
        "records": objects * 20,
        "objects_holding_matches": -(-objects // 50),
        "load_secs": round(load_secs, 1),
        "matched": matched,
        "erased": result.erased,
        "erase_secs": round(erase_secs, 3),
        "baseline_list_and_read_all_secs": round(scan_secs, 3),
        "erase_over_read_all_ratio": round(erase_secs / scan_secs, 2),
        "second_erase_noop_secs": round(again_secs, 3),
        "second_erase_erased": again.erased,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-rows", type=int, default=1_000_000)
    parser.add_argument("--s3-objects", type=int, default=1000)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: embedded, temporary)")
    parser.add_argument("--skip-pg", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {"benchmark": "erase_bench"}
    if not args.skip_pg and args.dsn:
        out["postgres"] = {"store": "dsn", **bench_pg(args.dsn, args.pg_rows)}
    elif not args.skip_pg:
        import tempfile

        from auditpipe.embedded_pg import EmbeddedPostgres

        with (
            tempfile.TemporaryDirectory() as tmp,
            EmbeddedPostgres(Path(tmp) / "pg").running() as dsn,
        ):
            out["postgres"] = {
                "store": "embedded PostgreSQL (pgserver)",
                **bench_pg(dsn, args.pg_rows),
            }
    if not args.skip_s3:
        out["s3"] = bench_s3(args.s3_objects)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
