"""`auditpipe export`: chat datasets and audit records as JSONL from the postgres sink's tables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from auditpipe.api.timeparse import TimeParseError, parse_time
from auditpipe.schemas import Event
from auditpipe.sinks.postgres import migration_sql

from benchmarks.bulkload import bulk_load

from .apiutil import by_request, captured_events, load, new_schema


@pytest.fixture(scope="module")
def stored(
    pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[Event]]]:
    events, _ = captured_events(plain=12)
    schema = new_schema()
    load(pg_dsn, schema, events)
    config = tmp_path_factory.mktemp("export") / "a.toml"
    config.write_text(f'[sinks.postgres]\ndsn = "{pg_dsn}"\nschema_name = "{schema}"\n')
    yield config, events


def export(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "auditpipe", "export", "--config", str(config), *args],
        capture_output=True,
        timeout=120,
        check=False,
    )


def lines(result: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr.decode()
    return [orjson.loads(line) for line in result.stdout.splitlines()]


class TestChatFormat:
    def test_one_line_per_answered_completion_with_the_answer_last(
        self, stored: tuple[Path, list[Event]]
    ) -> None:
        config, events = stored
        out = lines(export(config))
        answered = [
            e for e in events if e["endpoint"] == "/v1/chat/completions" and e["status_code"] == 200
        ]
        answered.sort(key=lambda e: (e["ts_ms"], e["event_id"]))
        assert len(out) == len(answered) == 17  # 12 plain, 3 streamed, pii, tool
        for row, event in zip(out, answered, strict=True):
            assert set(row) <= {"messages", "metadata", "tools"}
            assert row["messages"][:-1] == event["input"]["messages"]
            answer = event["output"]["choices"][0]["message"]
            assert row["messages"][-1]["role"] == "assistant"
            assert row["messages"][-1].get("content") == answer.get("content")
            assert row["metadata"] == event["metadata"]
        tool = next(r for r in out if "tools" in r)
        assert tool["messages"][-1]["tool_calls"][0]["function"]["name"] == "lookup"
        assert all(None not in m.values() for r in out for m in r["messages"][-1:])

    def test_filters_model_metadata_time_and_limit(self, stored: tuple[Path, list[Event]]) -> None:
        config, events = stored
        large = lines(export(config, "--model", "demo-echo-large"))
        assert len(large) == 3
        team_a_3 = lines(export(config, "--metadata", "team=a", "--metadata", "seq=3"))
        assert [r["metadata"] for r in team_a_3] == [{"team": "a", "seq": "3"}]
        assert lines(export(config, "--since", "1h", "--until", "now", "--limit", "4"))[3]
        assert len(lines(export(config, "--since", "1h", "--limit", "4"))) == 4
        assert lines(export(config, "--until", "2020-01-01")) == []
        ts = sorted(e["ts_ms"] for e in events)[5] / 1000
        since = __import__("datetime").datetime.fromtimestamp(ts, __import__("datetime").UTC)
        later = lines(export(config, "--format", "records", "--since", since.isoformat()))
        assert len(later) == len(events) - 5

    def test_output_file_and_progress_on_stderr(
        self, stored: tuple[Path, list[Event]], tmp_path: Path
    ) -> None:
        config, _ = stored
        target = tmp_path / "train.jsonl"
        result = export(config, "-o", str(target))
        assert result.returncode == 0 and result.stdout == b""
        assert len(target.read_bytes().splitlines()) == 17
        assert not (tmp_path / "train.jsonl.partial").exists()
        assert b"[auditpipe export] 17 row(s)" in result.stderr and b"train.jsonl" in result.stderr


class TestRecordsFormat:
    def test_every_record_as_its_audit_event(self, stored: tuple[Path, list[Event]]) -> None:
        config, events = stored
        out = lines(export(config, "--format", "records"))
        assert len(out) == len(events)  # errors and embeddings too
        stored_events = {r["event_id"]: r for r in out}
        for event in events:
            row = stored_events[event["event_id"]]
            for key in (
                "request_id",
                "endpoint",
                "model",
                "status_code",
                "metadata",
                "input",
                "output",
                "usage",
                "processing",
                "ts_ms",
            ):
                assert row[key] == event[key], key
        pii = by_request(out)["pii"]
        assert "[REDACTED:EMAIL]" in pii["input"]["messages"][0]["content"]


class TestBadInput:
    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["--since", "last tuesday"], "--since"),
            (["--metadata", "team"], "KEY=VALUE"),
            (["--limit", "-1"], "--limit"),
        ],
    )
    def test_bad_options_exit_2_naming_them(
        self, stored: tuple[Path, list[Event]], args: list[str], says: str
    ) -> None:
        config, _ = stored
        result = export(config, *args)
        assert result.returncode == 2 and says.encode() in result.stderr

    def test_unreachable_database_exits_1_and_leaves_no_file(self, tmp_path: Path) -> None:
        config = tmp_path / "a.toml"
        config.write_text(
            '[sinks.postgres]\ndsn = "postgresql://x@127.0.0.1:1/x"\nconnect_timeout_secs = 1\n'
        )
        result = export(config, "-o", str(tmp_path / "out.jsonl"))
        assert result.returncode == 1, result.stderr
        assert not list(tmp_path.glob("out.jsonl*"))


class TestTimeForms:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("2026-12-01", "2026-12-01T00:00:00+00:00"),
            ("2026-12-01T10:30:00Z", "2026-12-01T10:30:00+00:00"),
            ("2026-12-01 11:30+01:00", "2026-12-01T10:30:00+00:00"),
            ("90s", "2026-12-02T11:58:30+00:00"),
            ("2h", "2026-12-02T10:00:00+00:00"),
            ("7d", "2026-11-25T12:00:00+00:00"),
            ("1w", "2026-11-25T12:00:00+00:00"),
            ("3 days ago", "2026-11-29T12:00:00+00:00"),
            ("today", "2026-12-02T00:00:00+00:00"),
            ("yesterday", "2026-12-01T00:00:00+00:00"),
            ("1764547200", "2025-12-01T00:00:00+00:00"),
            ("1764547200000", "2025-12-01T00:00:00+00:00"),
        ],
    )
    def test_forms(self, text: str, expected: str) -> None:
        import datetime as dt

        now = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
        assert parse_time(text, now).isoformat() == expected

    def test_nonsense_lists_the_forms(self) -> None:
        with pytest.raises(TimeParseError, match=r"ISO-8601.*relative"):
            parse_time("next week")


def peak_rss_kib(cmd: list[str], out: Path) -> int:
    """Run ``cmd`` writing to ``out``; its peak resident set (KiB), from wait4."""
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return int(usage.ru_maxrss)


class TestConstantMemory:
    def test_exporting_100k_rows_takes_no_more_memory_than_10k(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        """The server-side cursor streams: peak RSS at 100k rows stays within 25% (and 20 MB)
        of 10k rows, while the output is ten times larger (rows/s: benchmarks/api_bench.py)."""
        schema = new_schema()
        with psycopg.connect(pg_dsn) as conn:
            conn.execute(migration_sql(schema))  # type: ignore[arg-type]
            conn.commit()
            bulk_load(conn, schema, 100_000)
        config = tmp_path / "a.toml"
        config.write_text(f'[sinks.postgres]\ndsn = "{pg_dsn}"\nschema_name = "{schema}"\n')
        base = [sys.executable, "-m", "auditpipe", "export", "--config", str(config)]
        small = peak_rss_kib([*base, "--limit", "10000"], tmp_path / "small.jsonl")
        large = peak_rss_kib(base, tmp_path / "large.jsonl")
        small_bytes = (tmp_path / "small.jsonl").stat().st_size
        large_bytes = (tmp_path / "large.jsonl").stat().st_size
        assert large_bytes > 9 * small_bytes > 0
        assert large < small * 1.25 and large - small < 20 * 1024, (small, large)
        with open(tmp_path / "large.jsonl", "rb") as fh:
            assert sum(1 for _ in fh) == 100_000
