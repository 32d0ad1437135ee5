"""The embedded default: PostgreSQL from the pgserver wheel shared by the sink, serve and export,
and `auditpipe dev` working on a bare machine for the postgres, file and s3 sinks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest

from auditpipe.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError

from .conftest import wait_until

HOLD = """
import sys, time
from auditpipe.embedded_pg import EmbeddedPostgres
EmbeddedPostgres(sys.argv[1]).acquire()
print("ready", flush=True)
time.sleep(600)
"""


def wait_until_or_none(predicate: Any, timeout_secs: float) -> bool:
    try:
        return bool(wait_until(predicate, timeout_secs, "condition"))
    except AssertionError:
        return False


def auditpipe(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "auditpipe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


class TestEmbeddedPostgres:
    def test_shared_by_processes_and_stopped_by_the_last_live_one(self, tmp_path: Path) -> None:
        """A killed user is pruned: the next process to let go stops the server."""
        data = tmp_path / "pg"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(data)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            pg = EmbeddedPostgres(data)
            assert pg.is_running()
            with pg.running() as dsn, psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert pg.is_running()  # the holder still uses it
            holder.send_signal(signal.SIGKILL)  # no release: its entry goes stale
            holder.wait(10)
            users = json.loads((tmp_path / "pg.users.json").read_text())
            assert list(users) == [str(holder.pid)]
            with pg.running():
                pass
            assert not pg.is_running()
            assert json.loads((tmp_path / "pg.users.json").read_text()) == {}
        finally:
            if holder.poll() is None:
                holder.kill()
            EmbeddedPostgres(data).stop()

    def test_a_non_empty_directory_without_a_cluster_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "pg").mkdir()
        (tmp_path / "pg" / "notes.txt").write_text("mine")
        with pytest.raises(EmbeddedPostgresError, match="embedded_data_dir"):
            EmbeddedPostgres(tmp_path / "pg").acquire()


class TestDevThenServe:
    def test_dev_postgres_then_serve_shows_the_twenty(self, tmp_path: Path) -> None:
        """The quick-start loop on a bare machine: no dsn, no migration, no settings."""
        dev = auditpipe(
            "--log-level", "INFO", "dev", "--sink", "postgres", "--requests", "20", cwd=tmp_path
        )
        assert dev.returncode == 0, dev.stderr
        assert "delivered=20" in dev.stderr and "auditpipe serve" in dev.stderr
        assert (tmp_path / ".auditpipe" / "postgres" / "PG_VERSION").exists()
        stopped = wait_until_or_none(
            lambda: not EmbeddedPostgres(tmp_path / ".auditpipe" / "postgres").is_running(), 10
        )
        assert stopped, f"dev left the embedded server running:\n{dev.stderr}"
        serve = subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "serve", "--port", "0"],
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert serve.stderr is not None
            line = ""
            for line in serve.stderr:  # log lines (INFO) may come before the banner
                if line.startswith("auditpipe serve:"):
                    break
            match = re.search(r"http://127\.0\.0\.1:\d+", line)
            assert match, line
            client = openai.OpenAI(base_url=match.group(0) + "/v1", api_key="-", max_retries=0)
            stored = list(client.chat.completions.list(limit=7))
            assert len(stored) == 20
            assert {c.metadata["source"] for c in stored} == {"auditpipe-dev"}
            assert sorted(int(c.metadata["seq"]) for c in stored) == list(range(20))
            export = auditpipe("export", "--format", "chat", cwd=tmp_path, timeout=60)
            assert export.returncode == 0, export.stderr
            assert len(export.stdout.splitlines()) == 20  # export joins the running server
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
        assert serve.returncode == 0
        wait_until(
            lambda: not EmbeddedPostgres(tmp_path / ".auditpipe" / "postgres").is_running(),
            10,
            "the embedded server to stop with its last user",
        )

    def test_migrate_without_a_dsn_creates_the_embedded_store(self, tmp_path: Path) -> None:
        for _ in range(2):
            out = auditpipe("sink", "postgres", "--migrate", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
        pg = EmbeddedPostgres(tmp_path / ".auditpipe" / "postgres")
        with pg.running() as dsn, psycopg.connect(dsn) as conn:
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'auditpipe'"
                )
            }
        assert tables == {"requests", "responses", "errors", "metadata", "api_changes"}


class TestDevDefaults:
    def test_file_sink_writes_under_dot_auditpipe(self, tmp_path: Path) -> None:
        out = auditpipe("dev", "--sink", "file", "--requests", "3", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        lines = (tmp_path / ".auditpipe" / "events.jsonl").read_text().splitlines()
        assert len(lines) == 3 and "events.jsonl" in out.stderr

    def test_s3_sink_gets_an_embedded_moto_bucket(self, tmp_path: Path) -> None:
        out = auditpipe("dev", "--sink", "s3", "--requests", "3", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "s3://auditpipe-dev" in out.stderr and "delivered=3" in out.stderr

    def test_explicit_settings_win(self, tmp_path: Path) -> None:
        config = tmp_path / "a.toml"
        config.write_text('[sinks.file]\npath = "elsewhere/out.jsonl"\n')
        out = auditpipe(
            "dev", "--sink", "file", "--requests", "2", "--config", str(config), cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        assert len((tmp_path / "elsewhere" / "out.jsonl").read_text().splitlines()) == 2
        assert not (tmp_path / ".auditpipe").exists()


def test_pgserver_binaries_are_shipped_by_the_wheel() -> None:
    from auditpipe.embedded_pg import pg_bin_dir

    assert os.access(pg_bin_dir() / "postgres", os.X_OK)
