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


class TestRedactionBenchmarks:
    def test_redact_bench_compares_with_main_in_the_same_run(self) -> None:
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "redact_bench.py"),
             "--events", "5", "--rounds", "1"],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        per_event = out["us_per_event_median"]
        assert set(per_event) == {"chat_clean", "chat_pii", "chat_headers", "chat_16k"}
        for entry in per_event.values():
            assert entry["after"] > 0 and entry["orjson"] > 0
            if out["before_ref"] is not None:  # main is there in a clone with history
                assert entry["before"] > 0 and entry["after_over_before"] > 0

    def test_redaction_quality_prints_recall_and_precision_per_kind(self) -> None:
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "redaction_quality.py")],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        assert {"recall", "precision", "recall_by_kind", "lookalikes_kept_by_kind"} <= set(out)
        assert "CREDENTIAL_HEADER" in out["recall_by_kind"] and out["secrets"] > 5000


class TestProxyBench:
    def test_prints_latency_throughput_and_ratios_as_json(self) -> None:
        """Direct and proxied runs, non-streaming and streaming, with the Kafka capture check."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "proxy_bench.py"),
             "--latency-requests", "20", "--throughput-requests", "40", "--rounds", "1",
             "--concurrency", "4"],
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        for mode in ("non_streaming", "streaming"):
            summary = out[mode]
            assert set(summary["latency_ms_median"]) == {"direct", "proxy", "proxy_capture_off"}
            assert summary["throughput_ratio_proxy_over_direct"] > 0
            assert set(summary["added_latency_ms"]) == {"p50", "p99"}
        captured = out["captured"]
        # each run: its requests plus as many warm-up requests (at most 50)
        assert captured["distinct_event_ids"] == captured["proxied_requests"] == 2 * (40 + 80)


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


class TestSettingsBench:
    def test_prints_load_costs_and_ratios_as_json(self) -> None:
        """Baseline, every sink table validated, ten env overrides: medians and ratios."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "settings_bench.py"), "--rounds", "3"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        assert out["baseline_us"] > 0 and out["all_sink_tables_and_pipeline_us"] > 0
        assert set(out["ratios"]) == {"sink_tables_over_baseline", "env_overrides_over_baseline"}


class TestMetricsBench:
    def test_prints_request_overhead_and_scrape_cost_as_json(self) -> None:
        """Bare vs wrapped request cost and one scrape's cost, with the ratio."""
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "metrics_bench.py"),
                "--requests",
                "200",
                "--rounds",
                "1",
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        assert set(out["request_ns"]) == {"bare_app", "with_request_metrics"}
        assert out["scrape_us"] > 0 and "wrapped_over_bare" in out["ratios"]


class TestEraseBench:
    def test_prints_erase_times_with_same_run_baselines_as_json(self) -> None:
        """One user among a few PostgreSQL rows and S3 objects, erased, with the baselines."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "erase_bench.py"),
             "--pg-rows", "3000", "--s3-objects", "20"],
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        pg, s3 = out["postgres"], out["s3"]
        assert pg["matched"] == pg["erased"] == 3 and pg["left_after"] == 0
        assert pg["second_erase_erased"] == 0 and pg["baseline_count_same_selector_secs"] > 0
        assert s3["matched"] == s3["erased"] == 1 and s3["second_erase_erased"] == 0
        assert s3["baseline_list_and_read_all_secs"] > 0 and s3["erase_over_read_all_ratio"] > 0


class TestShredBench:
    def test_prints_seal_and_decrypt_costs_with_the_plain_baseline(self) -> None:
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "shred_bench.py"),
             "--events", "50", "--subjects", "5", "--rounds", "1"],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        medians = out["ns_per_event_median"]
        assert set(medians) == {"json_line_plain", "seal_and_json_line", "decrypt_event"}
        assert all(v > 0 for v in medians.values()) and out["bytes_per_line"]["ratio"] > 1
        assert "sealed_over_plain" in out["ratios"]
