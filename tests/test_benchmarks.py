"""The benchmarks run and print what they promise (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TestCodecBench:
    def test_prints_medians_and_ratios_as_json(self) -> None:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "codec_bench.py"),
                "--events",
                "20",
                "--rounds",
                "1",
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        assert 1900 <= out["event_json_bytes"] <= 2300
        medians = out["ns_per_event_median"]
        assert {"avro_encode", "orjson_encode", "avro_decode", "orjson_decode"} <= set(medians)
        assert all(v > 0 for v in medians.values())
        assert set(out["ratios"]) >= {"encode_avro_over_orjson", "decode_avro_over_orjson"}


class TestProcessorBench:
    def test_prints_rates_cpu_costs_and_ratios_as_json(self) -> None:
        """Worker, bare Faust agent, passthrough and chain all run on a tiny stream."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "processor_bench.py"),
             "--events", "300", "--rounds", "1"],
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        kinds = {"passthrough", "faust_bare", "worker", "worker_step_process", "chain_in_process"}
        assert set(out["events_per_sec_median"]) == kinds
        assert all(v > 0 for v in out["events_per_sec_median"].values())
        assert kinds <= set(out["cpu_us_per_event_median"])
        assert 0 < out["worker_vs_passthrough"]


class TestApiBench:
    def test_prints_latencies_export_rates_and_memory_as_json(self) -> None:
        """List shapes against the SELECT 1 baseline, export rows/s and peak RSS, tiny sizes."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "api_bench.py"),
             "--rows", "3000", "--requests", "5"],
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        assert out["rows"] == 3000 and "baseline_healthz_select_1" in out["latency"]
        assert all(v["p50_ms"] > 0 for v in out["latency"].values())
        assert out["export"]["all"]["rows"] == 3000 and out["export"]["small"]["rows"] == 3000
        assert out["export"]["all"]["peak_rss_mib"] > 0
