"""What validating every table and the environment rule cost when settings load.

    .venv/bin/python benchmarks/settings_bench.py [--rounds 200]

Same run, same process: ``load_settings`` of a file with [kafka] only (the baseline), of a file
that also has a table for each of the five built-in sinks and a [pipeline] (every one validated
at load, none built), and of the baseline with ten ``AUDITPIPE_*`` overrides (sink, pipeline
and plain keys). Prints JSON: median microseconds per load and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from auditpipe.settings import load_settings

BASE = '[kafka]\nbootstrap = "kafka:9092"\n'
SINKS = (
    '[sinks.stdout]\n[sinks.file]\npath = "/tmp/a.jsonl"\n[sinks.s3]\nbucket = "audit"\n'
    '[sinks.mongodb]\nuri = "mongodb://m"\n[sinks.postgres]\ndsn = "postgresql://x/y"\n'
    'steps = ["redact"]\n[sinks.postgres.redact]\naction = "remove"\n'
    '[pipeline]\nsteps = ["enrich", "redact", "sample"]\n[pipeline.sample]\ndefault_rate = 0.5\n'
)
ENV = {
    "AUDITPIPE_KAFKA_RAW_TOPIC": "r",
    "AUDITPIPE_PRODUCER_CAPTURE_PATHS": "/v1/a,/v1/b",
    "AUDITPIPE_RUNNER_MAX_EVENTS": "500",
    "AUDITPIPE_SINKS_POSTGRES_DSN": "postgresql://a/b",
    "AUDITPIPE_SINKS_S3_BUCKET": "audit",
    "AUDITPIPE_SINKS_POSTGRES_POOL_MAX_SIZE": "4",
    "AUDITPIPE_PIPELINE_STEPS": "enrich,sample",
    "AUDITPIPE_PIPELINE_SAMPLE_DEFAULT_RATE": "0.1",
    "AUDITPIPE_LOG": "info,auditpipe.sinks=debug",
    "AUDITPIPE_METRICS_PORT": "9464",
}


def median_us(path: Path, env: dict[str, str], rounds: int) -> float:
    load_settings(path, env=env)  # warm: imports, entry points
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        load_settings(path, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, full = Path(tmp, "base.toml"), Path(tmp, "full.toml")
        base.write_text(BASE)
        full.write_text(BASE + SINKS)
        result = {
            "baseline_us": median_us(base, {}, args.rounds),
            "all_sink_tables_and_pipeline_us": median_us(full, {}, args.rounds),
            "ten_env_overrides_us": median_us(base, ENV, args.rounds),
        }
    b = result["baseline_us"]
    result["ratios"] = {
        "sink_tables_over_baseline": result["all_sink_tables_and_pipeline_us"] / b,
        "env_overrides_over_baseline": result["ten_env_overrides_us"] / b,
    }
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
