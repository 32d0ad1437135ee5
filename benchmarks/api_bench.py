"""The read side under load: stored-completions list latency and export throughput/memory.

    .venv/bin/python benchmarks/api_bench.py [--rows 100000] [--requests 200] [--dsn DSN]

Fills a fresh schema with ``--rows`` synthetic chat completions (benchmarks/bulkload.py:
generate_series, ~1.5 KB each, the sink's layout and the migration's indexes), serves it
with ``create_app`` under uvicorn on loopback, and measures over HTTP (httpx, keep-alive):

- list latency p50/p99 per query shape (first page asc/desc, a page deep in via ``after``,
  common and rare model, metadata filters matching 10%, 0.1% and one row, retrieve by id),
  against ``GET /healthz`` (one ``SELECT 1`` through the same server and pool) as baseline;
- ``auditpipe export`` (chat format) rows/s and peak RSS on 10k rows and on all rows (the
  ratio shows memory does not grow with rows).

Default store: an embedded PostgreSQL (pgserver) in a temporary directory; ``--dsn`` uses
another server. The 1M-row figure in the README: ``--rows 1000000`` (loading takes ~2 min).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bulkload import bulk_load  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(client: Any, url: str, params: dict[str, Any], n: int) -> dict[str, float]:
    for _ in range(min(10, n)):  # warm: plans cached, pages in the buffer cache
        client.get(url, params=params).raise_for_status()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = client.get(url, params=params)
        times.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(percentile(times, 0.99), 2),
    }


def peak_rss_export(config: Path, limit: int | None, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "auditpipe", "export", "--config", str(config), "-o", str(out)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(proc.stderr.read().decode() if proc.stderr else "export failed")
    with open(out, "rb") as fh:
        rows = sum(1 for _ in fh)
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_sec": round(rows / seconds),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # fmt: skip


def run(dsn: str, rows: int, requests: int, workdir: Path) -> dict[str, Any]:
    import httpx
    import psycopg
    import uvicorn
    from auditpipe.api.app import create_app
    from auditpipe.api.auth import KeyRing
    from auditpipe.api.store import Store
    from auditpipe.sinks.postgres import PostgresConfig, migration_sql

    from auditpipe.broker import free_port
    from auditpipe.settings import ServeSettings

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn) as conn:
        conn.execute(migration_sql(schema))  # type: ignore[arg-type]
        conn.commit()
        load_secs = bulk_load(conn, schema, rows)
    print(f"[api_bench] loaded {rows} rows in {load_secs:.1f}s", file=sys.stderr)
    serve = ServeSettings()
    config = PostgresConfig(dsn=dsn, schema_name=schema)
    app = create_app(Store(config, serve, dsn), KeyRing(serve))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    list_url = f"{base}/v1/chat/completions"
    middle = f"chatcmpl-bulk{rows // 2}"
    shapes: dict[str, tuple[str, dict[str, Any]]] = {
        "baseline_healthz_select_1": (f"{base}/healthz", {}),
        "list_first_page_asc": (list_url, {}),
        "list_first_page_desc": (list_url, {"order": "desc"}),
        "list_deep_page_after": (list_url, {"after": middle}),
        "list_model_common": (list_url, {"model": "gpt-4o"}),
        "list_model_rare_0.1pct": (list_url, {"model": "rare-model", "order": "desc"}),
        "list_metadata_10pct": (list_url, {"metadata[team]": "t3"}),
        "list_metadata_0.1pct": (list_url, {"metadata[user]": "u42", "order": "desc"}),
        "list_metadata_one_row": (list_url, {"metadata[ticket]": f"T-{rows // 3}"}),
        "list_limit_100": (list_url, {"limit": 100}),
        "retrieve_by_id": (f"{list_url}/{middle}", {}),
    }
    latency = {}
    with httpx.Client(timeout=60) as client:
        for name, (url, params) in shapes.items():
            latency[name] = measure(client, url, params, requests)
            print(f"[api_bench] {name}: {latency[name]}", file=sys.stderr)
    server.should_exit = True
    thread.join(10)
    base_p50 = latency["baseline_healthz_select_1"]["p50_ms"]
    cfg = workdir / "bench.toml"
    cfg.write_text(f'[sinks.postgres]\ndsn = {json.dumps(dsn)}\nschema_name = "{schema}"\n')
    small = peak_rss_export(cfg, min(10_000, rows), workdir / "small.jsonl")
    large = peak_rss_export(cfg, None, workdir / "large.jsonl")
    with psycopg.connect(dsn) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')  # type: ignore[arg-type]
        conn.commit()
    return {
        "rows": rows,
        "load_seconds": round(load_secs, 1),
        "requests_per_shape": requests,
        "latency": latency,
        "p50_over_baseline": {k: round(v["p50_ms"] / base_p50, 1) for k, v in latency.items()},
        "export": {"small": small, "all": large,
                   "rss_all_over_small": round(large["peak_rss_mib"] / small["peak_rss_mib"], 2)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="per query shape")
    parser.add_argument("--dsn", help="PostgreSQL to use (default: embedded, temporary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="auditpipe-apibench-") as tmp:
        workdir = Path(tmp)
        if args.dsn:
            result = run(args.dsn, args.rows, args.requests, workdir)
            result["store"] = "dsn"
        else:
            from auditpipe.embedded_pg import EmbeddedPostgres

            with EmbeddedPostgres(workdir / "pg").running() as dsn:
                result = run(dsn, args.rows, args.requests, workdir)
            result["store"] = "embedded PostgreSQL (pgserver)"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
