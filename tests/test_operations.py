"""Operating auditpipe: environment overrides, logging, the metrics vocabulary, the dashboard."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from auditpipe.schemas import encode, new_event
from auditpipe.sinks import create_sink
from prometheus_client.parser import text_string_to_metric_families

from auditpipe import logs
from auditpipe.broker import free_port
from auditpipe.errors import ConfigError
from auditpipe.metrics import VOCABULARY, Stage, exposition, make_registry, metric_names
from auditpipe.settings import Settings, load_settings

from .conftest import wait_until
from .kafkautil import produce, run

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDITPIPE_", "DYN_"))}
    return {**env, **extra}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parsed exposition text: (series name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace")


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "auditpipe", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"exited {proc.returncode}: {stop(proc)[1]}")
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


class TestEnvOverrides:
    """AUDITPIPE_<TABLE>_<KEY> reaches every table (auditpipe/env.py)."""

    def test_sink_key_reaches_the_sink_config(self) -> None:
        """AUDITPIPE_SINKS_POSTGRES_DSN and friends end up on the postgres sink's config."""
        env = {
            "AUDITPIPE_SINKS_POSTGRES_DSN": "postgresql://audit@db:5432/audit",
            "AUDITPIPE_SINKS_POSTGRES_POOL_MAX_SIZE": "3",
            "AUDITPIPE_SINKS_POSTGRES_AUTO_MIGRATE": "false",
        }
        settings = load_settings(env=env)
        sink = create_sink("postgres", settings.sinks, "environment")
        cfg: Any = sink.config
        assert cfg.dsn == "postgresql://audit@db:5432/audit"
        assert cfg.pool_max_size == 3 and cfg.auto_migrate is False

    def test_env_overrides_the_file(self, tmp_path: Path) -> None:
        """A variable wins over the same key of the settings file; other keys stay."""
        path = tmp_path / "s.toml"
        path.write_text('[sinks.s3]\nbucket = "from-file"\nprefix = "p"\n')
        settings = load_settings(path, env={"AUDITPIPE_SINKS_S3_BUCKET": "from-env"})
        assert settings.sinks["s3"] == {"bucket": "from-env", "prefix": "p"}

    @pytest.mark.parametrize(
        "raw", ["enrich, sample", '["enrich", "sample"]'], ids=["comma", "json"]
    )
    def test_lists_are_comma_separated_or_json(self, raw: str) -> None:
        """A list key takes a,b or a JSON array; in [pipeline] and in a sink's steps."""
        settings = load_settings(
            env={
                "AUDITPIPE_PIPELINE_STEPS": raw,
                "AUDITPIPE_SINKS_FILE_STEPS": raw,
                "AUDITPIPE_SINKS_FILE_PATH": "/tmp/x.jsonl",
            }
        )
        assert settings.pipeline["steps"] == ["enrich", "sample"]
        sink = create_sink("file", settings.sinks, "environment")
        assert [s.name for s in sink.steps] == ["enrich", "sample"]  # type: ignore[attr-defined]

    def test_step_table_of_a_sink_and_of_the_pipeline(self) -> None:
        """Nested tables join the same way: [sinks.postgres.redact] and [pipeline.sample]."""
        settings = load_settings(
            env={
                "AUDITPIPE_SINKS_POSTGRES_STEPS": "redact",
                "AUDITPIPE_SINKS_POSTGRES_REDACT_ACTION": "remove",
                "AUDITPIPE_PIPELINE_SAMPLE_DEFAULT_RATE": "0.25",
            }
        )
        assert settings.sinks["postgres"]["redact"] == {"action": "remove"}
        assert settings.pipeline["sample"] == {"default_rate": "0.25"}
        sink = create_sink("postgres", settings.sinks, "environment")
        assert sink.steps[0].config.action == "remove"  # type: ignore[attr-defined]

    def test_longest_name_wins_and_double_underscore_separates(self) -> None:
        """capture vs capture_paths: the longest known key; __ is an explicit separator."""
        settings = load_settings(
            env={
                "AUDITPIPE_PRODUCER_CAPTURE": "all",
                "AUDITPIPE_PRODUCER_CAPTURE_PATHS": "/v1/x,/v1/y",
                "AUDITPIPE_KAFKA__RAW_TOPIC": "raw.explicit",
                "AUDITPIPE_SINKS__FILE__PATH": "/tmp/explicit.jsonl",
            }
        )
        assert settings.producer.capture == "all"
        assert settings.producer.capture_paths == ["/v1/x", "/v1/y"]
        assert settings.kafka.raw_topic == "raw.explicit"
        assert settings.sinks["file"]["path"] == "/tmp/explicit.jsonl"

    @pytest.mark.parametrize(
        ("env", "needles"),
        [
            (
                {"AUDITPIPE_SINKS_POSTGRES_DNS": "x"},
                ["AUDITPIPE_SINKS_POSTGRES_DNS", "did you mean AUDITPIPE_SINKS_POSTGRES_DSN"],
            ),
            (
                {"AUDITPIPE_KAFKA_BOOTSTRAPS": "x"},
                ["AUDITPIPE_KAFKA_BOOTSTRAPS", "did you mean AUDITPIPE_KAFKA_BOOTSTRAP"],
            ),
            (
                {"AUDITPIPE_PIPELINE_REDACT_ACTOIN": "x"},
                ["AUDITPIPE_PIPELINE_REDACT_ACTOIN", "AUDITPIPE_PIPELINE_REDACT_ACTION"],
            ),
            (
                {"AUDITPIPE_SINKS_POSTGRESQL_DSN": "x"},
                ["AUDITPIPE_SINKS_POSTGRESQL_DSN", "no sink"],
            ),
            ({"AUDITPIPE_SINKS_POSTGRES": "x"}, ["[sinks.postgres] is a table"]),
            ({"AUDITPIPE_SERVE_API_KEYS": '["k1"'}, ["AUDITPIPE_SERVE_API_KEYS", "not valid JSON"]),
            ({"AUDITPIPE_RUNNER_MAX_EVENTS": "many"}, ["runner.max_events"]),
            ({"AUDITPIPE_SINKS_POSTGRES_POOL_MAX_SIZE": "0"}, ["sinks.postgres.pool_max_size"]),
        ],
    )
    def test_errors_name_the_variable_and_the_closest_key(
        self, env: dict[str, str], needles: list[str]
    ) -> None:
        """Unknown keys, unknown sinks, bad JSON and bad values are errors naming them."""
        with pytest.raises(ConfigError) as info:
            load_settings(env=env)
        for needle in needles:
            assert needle in str(info.value)

    def test_variables_that_name_no_table_are_not_settings(self) -> None:
        """AUDITPIPE_LOG, AUDITPIPE_TEST_*, a step's secret... are left alone (no error)."""
        settings = load_settings(
            env={
                "AUDITPIPE_CONFIG": "/nowhere.toml",
                "AUDITPIPE_LOG": "info,auditpipe.sinks=debug",
                "AUDITPIPE_LOG_FORMAT": "json",
                "AUDITPIPE_TEST_ANYTHING": "1",
                "AUDITPIPE_ERASURE_HASH_KEY": "k",
                "AUDITPIPE_REDACT_HASH_KEY": "k",
                "AUDITPIPE_ENABLED": "0",
            }
        )
        assert settings.logging.format == "json"
        assert settings.logging.level == "info,auditpipe.sinks=debug"
        assert settings.producer.enabled is False

    def test_typo_in_a_sink_that_is_not_run_is_an_error(self, tmp_path: Path) -> None:
        """Every [sinks.NAME] table is validated when settings load, naming the key."""
        path = tmp_path / "s.toml"
        path.write_text('[sinks.stdout]\n[sinks.mongodb]\nuri = "mongodb://m"\ncolection = "x"\n')
        with pytest.raises(ConfigError, match=r"sinks\.mongodb\.colection: unknown key"):
            load_settings(path, env={})

    def test_unknown_sink_table_and_step_typo_are_errors(self, tmp_path: Path) -> None:
        """[sinks.NAME] of no installed sink, and a typo in [pipeline.redact], name the key."""
        path = tmp_path / "s.toml"
        path.write_text("[sinks.postgress]\n")
        with pytest.raises(ConfigError, match=r"sinks\.postgress: unknown sink 'postgress'"):
            load_settings(path, env={})
        path.write_text('[pipeline.redact]\nactoin = "remove"\n')
        with pytest.raises(ConfigError, match=r"pipeline\.redact\.actoin: unknown key"):
            load_settings(path, env={})

    def test_validation_builds_nothing_and_imports_no_driver(self, tmp_path: Path) -> None:
        """Loading settings with every sink table imports no boto3/pymongo/psycopg/faust, and a
        step whose secret is missing is not built (only the process that runs it needs it)."""
        path = tmp_path / "s.toml"
        path.write_text(
            '[sinks.s3]\nbucket = "audit"\n[sinks.mongodb]\nuri = "mongodb://m"\n'
            '[sinks.postgres]\ndsn = "postgresql://x/y"\n[sinks.file]\npath = "/tmp/a.jsonl"\n'
            '[pipeline.redact]\naction = "hash"\nhash_key_env = "AUDITPIPE_TEST_UNSET_KEY"\n'
        )
        code = (
            "import sys; from auditpipe.settings import load_settings; "
            f"load_settings({str(path)!r}, env={{}}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'boto3', 'botocore', 'pymongo', 'psycopg', 'faust'}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=clean_env(), capture_output=True, check=True
        )
        assert out.stdout.decode().strip() == "[]"


class TestLogging:
    """auditpipe/logs.py: one setup, text or JSON lines, per-logger levels."""

    @pytest.fixture
    def stream(self) -> Iterator[io.StringIO]:
        out = io.StringIO()
        yield out
        logs.setup(None, "warning")  # back to the default for the rest of the session

    def test_level_spec(self) -> None:
        """A default level and logger=level pairs, in one string."""
        assert logs.parse_level_spec("info,auditpipe.sinks=debug, aiokafka=WARN") == (
            logging.INFO,
            {"auditpipe.sinks": logging.DEBUG, "aiokafka": logging.WARNING},
        )
        assert logs.parse_level_spec("auditpipe=error") == (None, {"auditpipe": logging.ERROR})

    @pytest.mark.parametrize("spec", ["verbose", "info,auditpipe.sinks=loud", "=debug"])
    def test_bad_level_names_the_key(self, spec: str) -> None:
        """[logging] level / AUDITPIPE_LOG that is not a level is an error naming the key."""
        with pytest.raises(ConfigError, match=r"logging\.level.*AUDITPIPE_LOG"):
            load_settings(env={"AUDITPIPE_LOG": spec})

    def test_bad_level_on_the_command_line(self) -> None:
        """--log-level: exit 2 naming the option."""
        out = subprocess.run(
            [sys.executable, "-m", "auditpipe", "--log-level", "chatty", "sink", "--list"],
            env=clean_env(),
            capture_output=True,
        )
        assert out.returncode == 2 and b"--log-level" in out.stderr

    def test_json_lines_carry_ids_and_per_logger_levels(self, stream: io.StringIO) -> None:
        """JSON fields; ids from bind_ids() and from extra=; a logger's level covers children."""
        cfg = load_settings(
            env={"AUDITPIPE_LOG_FORMAT": "json", "AUDITPIPE_LOG": "warning,auditpipe.sinks=debug"}
        ).logging
        logs.setup(cfg, "info", stream=stream)
        logging.getLogger("auditpipe.sinks.runner").debug("shown %d", 1)
        logging.getLogger("auditpipe.other").info("hidden")
        with logs.bind_ids(trace_id="4bf92f3577b34da6a3ce929d0e0e4736"):
            logging.getLogger("auditpipe.x").warning("in a trace")
        logging.getLogger("auditpipe.x").error("by extra", extra={"request_id": "req-1"})
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["message"] for line in lines] == ["shown 1", "in a trace", "by extra"]
        first = lines[0]
        assert first["level"] == "debug" and first["logger"] == "auditpipe.sinks.runner"
        assert first["pid"] == os.getpid() and first["time"].endswith("Z")
        assert "trace_id" not in first
        assert lines[1]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert lines[2]["request_id"] == "req-1" and "trace_id" not in lines[2]

    def test_local_time_and_text_format(self, stream: io.StringIO) -> None:
        """utc = false writes the local offset; text lines carry the ids in brackets."""
        cfg = load_settings(env={"AUDITPIPE_LOGGING_UTC": "false"}).logging
        logs.setup(cfg, "info", stream=stream)
        logging.getLogger("auditpipe.t").info("hello", extra={"request_id": "r9"})
        line = stream.getvalue().strip()
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO", line), line
        assert line.endswith("auditpipe.t: hello [request_id=r9]")


class TestMetrics:
    """One vocabulary (auditpipe/metrics.py) on every long-running command's /metrics."""

    def test_only_vocabulary_names_are_exported(self) -> None:
        """A stage with every field set produces families of the vocabulary only."""
        stage = Stage(
            "x",
            received=1,
            sent=1,
            retries=1,
            spooled=1,
            replayed=1,
            dropped={"a": 1},
            dead_lettered={"b": 1},
            skipped={"c": 1},
            errors={"T": 1},
            counts={"k": 1},
            lag={"t[0]": 3},
            gauges={"auditpipe_queue_depth": 2.0},
            by_dimension={("model", "m"): 1},
            latency={"w": ((0.1, 1.0), [1, 0, 0], 0.05)},
        )
        registry, _ = make_registry(lambda: [stage])
        text = exposition(registry)[0].decode()
        names = {name for name, _ in samples(text)}
        assert names <= metric_names()
        families = {f.name for f in text_string_to_metric_families(text)}
        assert families == set(VOCABULARY)

    def test_a_gauge_outside_the_vocabulary_is_refused(self) -> None:
        registry, _ = make_registry(lambda: [Stage("x", gauges={"my_gauge": 1.0})])
        with pytest.raises(ValueError, match="my_gauge"):
            exposition(registry)

    def test_sink_runner_process(self, settings: Settings) -> None:
        """`auditpipe sink stdout` configured by env only: /metrics on [metrics] port counts
        what it wrote (stage sink.stdout); its log is JSON lines."""
        port = free_port()
        env = clean_env(
            AUDITPIPE_KAFKA_BOOTSTRAP=settings.kafka.bootstrap or "",
            AUDITPIPE_KAFKA_EVENTS_TOPIC=settings.kafka.events_topic,
            AUDITPIPE_KAFKA_DLQ_TOPIC=settings.kafka.dlq_topic,
            AUDITPIPE_RUNNER_GROUP_PREFIX=settings.runner.group_prefix,
            AUDITPIPE_RUNNER_SESSION_TIMEOUT_SECS=str(settings.runner.session_timeout_secs),
            AUDITPIPE_RUNNER_HEARTBEAT_INTERVAL_SECS="0.5",
            AUDITPIPE_METRICS_PORT=str(port),
            AUDITPIPE_LOG_FORMAT="json",
        )
        values = [encode(new_event(model="m")) for _ in range(5)] + [b"not avro"]
        run(produce(settings.kafka.bootstrap or "", settings.kafka.events_topic, values))
        proc = spawn(["sink", "stdout"], env)
        try:
            stage = "sink.stdout"
            text = wait_until(
                lambda: (
                    (t := scrape(port))
                    and value(t, "auditpipe_events_sent_total", stage=stage) == 5
                    and t
                ),
                60,
                "5 events written on /metrics",
            )
            assert value(text, "auditpipe_events_received_total", stage=stage) == 6
            dead = value(
                text, "auditpipe_events_dead_lettered_total", stage=stage, reason="bad_magic"
            )
            assert dead == 1
            assert value(text, "auditpipe_latency_seconds_count", stage=stage, op="write")
            assert (
                "auditpipe_lag",
                frozenset({("stage", stage), ("partition", f"{settings.kafka.events_topic}[0]")}),
            ) in samples(text)
        finally:
            code, err = stop(proc)
        assert code == 0, err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert any(line["logger"].startswith("auditpipe") for line in lines), err
        assert all(line["level"] in ("debug", "info", "warning", "error") for line in lines)
        assert all({"time", "level", "logger", "message", "pid"} <= set(line) for line in lines)

    def test_receiver_process(self) -> None:
        """`auditpipe receive`: its own /metrics and [metrics] port; JSON lines from uvicorn."""
        port, metrics_port = free_port(), free_port()
        env = clean_env(
            AUDITPIPE_PRODUCER_TRANSPORT="stdout",
            AUDITPIPE_METRICS_PORT=str(metrics_port),
            AUDITPIPE_LOG_FORMAT="json",
        )
        proc = spawn(["receive", "--port", str(port)], env)
        try:
            wait_until(lambda: listening(proc, port), 30, "the receiver to listen")
            import httpx

            assert httpx.post(f"http://127.0.0.1:{port}/", content=b"{}").status_code == 400
            own = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            separate = wait_until(lambda: scrape(metrics_port), 30, "[metrics] port")
            for text in (own, separate):
                assert value(text, "auditpipe_events_dropped_total", stage="receiver",
                             reason="rejected") == 1  # fmt: skip
                assert value(text, "auditpipe_events_received_total", stage="producer") == 0
        finally:
            code, err = stop(proc)
        assert code == 0, err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        loggers = {line["logger"] for line in lines}
        assert "uvicorn.error" in loggers and "auditpipe.metrics" in loggers, err
        assert all(line["pid"] == proc.pid for line in lines)

    def test_proxy_process(self) -> None:
        """`auditpipe proxy`: an unreachable upstream counts as an error of stage proxy."""
        port, metrics_port, dead = free_port(), free_port(), free_port()
        env = clean_env(
            AUDITPIPE_PRODUCER_TRANSPORT="stdout", AUDITPIPE_METRICS_PORT=str(metrics_port)
        )
        proc = spawn(["proxy", "--upstream", f"http://127.0.0.1:{dead}", "--port", str(port)], env)
        try:
            wait_until(lambda: listening(proc, port), 30, "the proxy to listen")
            import httpx

            assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 502
            text = wait_until(lambda: scrape(metrics_port), 30, "[metrics] port")
            assert value(text, "auditpipe_events_received_total", stage="proxy") == 1
            errors = {
                dict(labels)["type"]: v
                for (name, labels), v in samples(text).items()
                if name == "auditpipe_errors_total" and ("stage", "proxy") in labels
            }
            assert errors.pop("http_5xx") == 1 and sum(errors.values()) == 1, errors
            assert value(text, "auditpipe_latency_seconds_count", stage="proxy", op="request") == 1
        finally:
            code, err = stop(proc)
        assert code == 0, err

    def test_ingest_process(self, tmp_path: Path) -> None:
        """`auditpipe ingest --follow`: lines in, records published, other lines counted."""
        from .test_ingest import AUDIT_RECORD

        port = free_port()
        src = tmp_path / "audit.jsonl"
        src.write_text("2025-09-02T15:50:01Z INFO a log line\n" + json.dumps(AUDIT_RECORD) + "\n")
        env = clean_env(AUDITPIPE_PRODUCER_TRANSPORT="stdout", AUDITPIPE_METRICS_PORT=str(port))
        proc = spawn(["ingest", "--follow", "--no-state", str(src)], env)
        try:

            def published() -> str:
                text = scrape(port)
                sent = value(text, "auditpipe_events_sent_total", stage="producer") if text else 0
                return text if sent == 1 else ""

            text = wait_until(published, 30, "the record published, on /metrics")
            assert value(text, "auditpipe_events_received_total", stage="ingest") == 2
            assert value(text, "auditpipe_events_sent_total", stage="ingest") == 1
            other = [v for (name, labels), v in samples(text).items()
                     if name == "auditpipe_stage_events_total" and ("stage", "ingest") in labels
                     and dict(labels)["kind"].startswith("other_")]  # fmt: skip
            assert other == [1]
        finally:
            stop(proc)

    def test_serve_request_metrics_in_process(self) -> None:
        """`auditpipe serve`'s wrapper: requests by status class and their latency, scraped
        from the [metrics] port's thread server."""
        import asyncio

        import httpx

        from auditpipe.metrics import RequestMetrics, serve_thread

        async def app(scope: Any, receive: Any, send: Any) -> None:
            status = 500 if scope["path"] == "/boom" else 200
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"x"})

        wrapped = RequestMetrics(app, "serve")

        async def requests() -> None:
            transport = httpx.ASGITransport(app=wrapped)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for path in ("/", "/v1/chat/completions", "/boom"):
                    await client.get(path)

        asyncio.run(requests())
        server = serve_thread(make_registry(wrapped.source())[0], "127.0.0.1", 0)
        assert server is not None
        try:
            text = scrape(server.port)
        finally:
            server.close()
            server.close()  # safe twice
        assert value(text, "auditpipe_events_received_total", stage="serve") == 3
        assert value(text, "auditpipe_errors_total", stage="serve", type="http_5xx") == 1
        assert value(text, "auditpipe_stage_events_total", stage="serve", kind="http_2xx") == 2
        assert value(text, "auditpipe_latency_seconds_count", stage="serve", op="request") == 3


class TestDashboard:
    """deploy/grafana/auditpipe.json uses only metric names the code defines."""

    def test_every_expr_uses_known_metric_names(self) -> None:
        board = json.loads((ROOT / "deploy" / "grafana" / "auditpipe.json").read_text())
        exprs = [
            target["expr"]
            for panel in board["panels"]
            for target in panel.get("targets", [])
            if "expr" in target
        ]
        assert len(exprs) >= 8
        known = metric_names()
        used = set()
        for expr in exprs:
            for name in re.findall(r"\bauditpipe_[a-z_]+", expr):
                assert name in known, f"{name} in {expr!r} is not defined by auditpipe.metrics"
                used.add(name)
        for core in ("auditpipe_events_received_total", "auditpipe_events_sent_total",
                     "auditpipe_events_dropped_total", "auditpipe_events_dead_lettered_total",
                     "auditpipe_errors_total", "auditpipe_lag",
                     "auditpipe_latency_seconds_bucket"):  # fmt: skip
            assert core in used, f"the dashboard does not chart {core}"

    def test_operations_doc_lists_every_metric(self) -> None:
        """docs/operations.md's table names every family of the vocabulary."""
        text = (ROOT / "docs" / "operations.md").read_text()
        for name, (kind, _, _) in VOCABULARY.items():
            shown = f"{name}_total" if kind == "counter" else name
            assert f"`{shown}`" in text, f"docs/operations.md does not list {shown}"
