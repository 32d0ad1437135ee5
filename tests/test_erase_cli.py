"""`auditpipe erase` and `auditpipe retention` end to end: receipts, exit codes, refusal, the
erasure event on Kafka (embedded broker), kill -9 mid-erasure then a rerun, and serve's DELETE
through the erasure path."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from auditpipe.schemas import decode

from auditpipe.cli import main
from auditpipe.privacy.selector import Selector

from .erasefixtures import (
    FileHarness,
    FilteringMongo,
    MongoHarness,
    PgHarness,
    S3Harness,
    population,
)
from .kafkautil import consume
from .sinkfixtures import MotoS3

KEY = "k3y-for-tests"


def write_config(path: Path, harnesses: list[Any], extra: str = "") -> Path:
    lines = [extra]
    for h in harnesses:
        lines.append(f"[sinks.{h.name}]")
        for k, v in h.config.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(capsys: Any, *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    try:
        return code, json.loads(out)
    except json.JSONDecodeError:
        return code, out


@pytest.fixture(autouse=True)
def hash_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDITPIPE_ERASURE_HASH_KEY", KEY)
    monkeypatch.setenv("AUDITPIPE_OPERATOR", "dpo@example.com")


class TestEraseCommand:
    def test_erases_from_every_store_and_writes_an_erasure_event_without_the_subject(
        self, tmp_path: Path, moto_s3: MotoS3, pg_dsn: str, kafka_bootstrap: str,
        capsys: Any,
    ) -> None:  # fmt: skip
        """Receipt per sink; the event on kafka.events_topic has counts and an HMAC, not the
        user's id or content."""
        events = population(24)
        stores = [FileHarness(tmp_path), S3Harness(moto_s3), PgHarness(pg_dsn)]
        for h in stores:
            h.load(events)
        topic = f"events-{os.getpid()}-{time.monotonic_ns()}"
        cfg = write_config(
            tmp_path / "c.toml", stores,
            f'[kafka]\nbootstrap = "{kafka_bootstrap}"\nevents_topic = "{topic}"\n',
        )  # fmt: skip
        n = sum(Selector("user", "alice").matches(e) for e in events)

        code, dry = run_cli(capsys, "erase", "--config", str(cfg), "--user", "alice",
                            "--dry-run", "--json")  # fmt: skip
        assert code == 0 and [r["matched"] for r in dry["receipts"]] == [n, n, n]

        code, out = run_cli(capsys, "erase", "--config", str(cfg), "--user", "alice", "--yes",
                            "--reason", "GDPR art. 17 ticket 42", "--json")  # fmt: skip
        assert code == 0, out
        assert {r["sink"]: (r["matched"], r["erased"]) for r in out["receipts"]} == {
            "file": (n, n), "s3": (n, n), "postgres": (n, n),
        }  # fmt: skip
        assert out["event_sent"] == topic
        (record,) = asyncio.run(consume(kafka_bootstrap, topic, 1))
        event = decode(record.value)
        assert event["log_type"] == "erasure" and event["event_id"] == out["event_id"]
        meta = event["metadata"]
        subject = json.dumps({"kind": "user", "metadata": {}, "value": "alice"},
                             separators=(",", ":")).encode()  # fmt: skip
        assert meta["selector_hmac"] == hmac.new(KEY.encode(), subject, hashlib.sha256).hexdigest()
        assert meta["erased"] == str(3 * n) and meta["operator"] == "dpo@example.com"
        assert meta["reason"] == "GDPR art. 17 ticket 42"
        assert "alice" not in record.value.decode("latin-1")
        assert event["input"] is None and event["output"] is None

        code, again = run_cli(capsys, "erase", "--config", str(cfg), "--user", "alice", "--yes",
                              "--json")  # fmt: skip
        assert code == 0 and all(r["erased"] == 0 for r in again["receipts"])

    def test_without_yes_and_without_a_terminal_it_refuses_and_changes_nothing(
        self, tmp_path: Path, capsys: Any
    ) -> None:
        h = FileHarness(tmp_path)
        h.load(population(12))
        before = h.snapshot()
        cfg = write_config(tmp_path / "c.toml", [h])
        assert main(["erase", "--config", str(cfg), "--user", "alice"]) == 5
        assert "refused" in capsys.readouterr().err
        assert h.snapshot() == before

    def test_bad_usage_names_the_fix(self, tmp_path: Path, capsys: Any) -> None:
        h = FileHarness(tmp_path)
        cfg = write_config(tmp_path / "c.toml", [h])
        for argv, expected in (
            (["--user", "a", "--tenant", "b"], "exactly one subject"),
            ([], "exactly one subject"),
            (["--metadata", "novalue"], "KEY=VALUE"),
            (["--user", "a", "--since", "2026-12-02", "--until", "2026-12-01"], "--since"),
            (["--user", "a", "--sink", "mongodb"], "no [sinks.mongodb] table"),
            (["--user", "a", "--override-retention"], "needs --reason"),
        ):
            assert main(["erase", "--config", str(cfg), *argv, "--yes"]) == 2
            assert expected in capsys.readouterr().err

    def test_the_hash_key_is_required_before_anything_is_erased(
        self, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("AUDITPIPE_ERASURE_HASH_KEY")
        h = FileHarness(tmp_path)
        h.load(population(12))
        before = h.snapshot()
        cfg = write_config(tmp_path / "c.toml", [h])
        assert main(["erase", "--config", str(cfg), "--user", "alice", "--yes"]) == 2
        assert "AUDITPIPE_ERASURE_HASH_KEY" in capsys.readouterr().err
        assert h.snapshot() == before

    def test_min_retention_keeps_young_records_exit_4_and_override_is_on_the_receipt(
        self, tmp_path: Path, capsys: Any, kafka_bootstrap: str
    ) -> None:
        now = time.time_ns() // 1_000_000
        h = FileHarness(tmp_path)
        h.load(population(12, base_ms=now - 86_400_000))
        privacy = "[privacy]\nmin_retention_days = 183\n"
        cfg = write_config(tmp_path / "k.toml", [h],
                           f'[kafka]\nbootstrap = "{kafka_bootstrap}"\n{privacy}')  # fmt: skip
        code, out = run_cli(capsys, "erase", "--config", str(cfg), "--user", "alice", "--yes",
                            "--json")  # fmt: skip
        assert code == 4 and out["receipts"][0]["erased"] == 0
        assert list(out["receipts"][0]["skipped"]) == [
            "younger than [privacy] min_retention_days (183 days)"
        ]
        cfg = write_config(tmp_path / "c.toml", [h], privacy)
        code, out = run_cli(capsys, "erase", "--config", str(cfg), "--user", "alice", "--yes",
                            "--override-retention", "--reason", "court order 7")  # fmt: skip
        assert code == 1  # erased, but no kafka.bootstrap for the event: says so
        assert "erased 4" in out and "overridden: court order 7" in out
        assert "erasure event NOT sent (kafka.bootstrap is not set)" in out


class TestRetentionCommand:
    def test_reports_then_applies_what_aged_out(
        self, tmp_path: Path, moto_s3: MotoS3, pg_dsn: str, capsys: Any
    ) -> None:
        """file, s3, postgres and mongodb (mockupdb) with retention_days = 30; a sink without
        it keeps everything."""
        now = time.time_ns() // 1_000_000
        old = population(10, base_ms=now - 40 * 86_400_000)
        new = population(10, base_ms=now - 86_400_000)
        mongo = FilteringMongo()
        try:
            stores: list[Any] = [
                FileHarness(tmp_path, retention_days=30), S3Harness(moto_s3, retention_days=30),
                PgHarness(pg_dsn, retention_days=30), MongoHarness(mongo, retention_days=30),
            ]  # fmt: skip
            for h in stores:
                h.load(old + new)
            cfg = write_config(tmp_path / "c.toml", stores)
            code, out = run_cli(capsys, "retention", "--config", str(cfg), "--json")
            assert code == 0
            assert [(r["sink"], r["aged_out"], r["erased"]) for r in out["sinks"]] == [
                ("file", 10, 0), ("s3", 10, 0), ("postgres", 10, 0), ("mongodb", 10, 0),
            ]  # fmt: skip
            code, out = run_cli(capsys, "retention", "--config", str(cfg), "--apply", "--json")
            assert code == 0 and [r["erased"] for r in out["sinks"]] == [10, 10, 10, 10]
            keep = {e["event_id"] for e in new}
            assert all(set(h.snapshot()) == keep for h in stores)
            plain = write_config(tmp_path / "p.toml", [FileHarness(tmp_path)])
            code, text = run_cli(capsys, "retention", "--config", str(plain))
            assert code == 0 and "file: no retention_days: keeps every record" in text
        finally:
            mongo.stop()

    def test_retention_shorter_than_min_retention_is_a_config_error(
        self, tmp_path: Path, capsys: Any
    ) -> None:
        cfg = write_config(tmp_path / "c.toml", [FileHarness(tmp_path, retention_days=30)],
                           "[privacy]\nmin_retention_days = 183\n")  # fmt: skip
        assert main(["retention", "--config", str(cfg)]) == 2
        assert "sinks.file.retention_days" in capsys.readouterr().err


class TestInterrupted:
    @pytest.mark.parametrize("store", ["file", "postgres", "s3"])
    def test_kill_9_mid_erasure_then_rerun_completes_and_loses_nothing_that_stays(
        self, store: str, tmp_path: Path, moto_s3: MotoS3, pg_dsn: str
    ) -> None:
        events = population(36)
        if store == "file":
            h: Any = FileHarness(tmp_path)
        elif store == "postgres":
            h = PgHarness(pg_dsn)
        else:
            h = S3Harness(moto_s3, concurrency=1)
        h.load(events)
        before = h.snapshot()
        sel = Selector("user", "alice")
        doomed = {e["event_id"] for e in events if sel.matches(e)}
        cfg = write_config(tmp_path / "c.toml", [h])
        marker = tmp_path / "marker"
        env = {**os.environ, "AUDITPIPE_ERASURE_HASH_KEY": KEY}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.erase_victim", store, str(cfg), str(marker)],
            cwd=Path(__file__).parent.parent, env=env, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the erasure never reached its midpoint"
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        middle = h.snapshot()
        assert {k: v for k, v in before.items() if k not in doomed} == {
            k: v for k, v in middle.items() if k not in doomed
        }, "a record that must stay was lost or changed"
        assert 0 < len(set(middle) & doomed) < len(doomed)  # really interrupted half-way

        from auditpipe.privacy.erasure import erase_everywhere

        async def rerun() -> Any:
            sink = h.sink()
            try:
                return await erase_everywhere({store: sink}, sel)
            finally:
                await sink.stop()

        (receipt,) = asyncio.run(rerun())
        assert receipt.error is None and receipt.erased == len(set(middle) & doomed)
        assert h.snapshot() == {k: v for k, v in before.items() if k not in doomed}
        if store == "file":
            assert not list(h.dir.glob("*.erase-tmp"))


class TestServeDelete:
    def _server(self, pg: PgHarness, sinks: dict[str, Any], min_days: float = 0) -> Any:
        import uvicorn
        from auditpipe.api.app import create_app
        from auditpipe.api.auth import KeyRing
        from auditpipe.api.erasure import erasing_deleter
        from auditpipe.api.store import Store
        from auditpipe.sinks.postgres import PostgresConfig

        from auditpipe.broker import free_port
        from auditpipe.settings import ServeSettings

        serve = ServeSettings()
        app = create_app(
            Store(PostgresConfig(dsn=pg.dsn, schema_name=pg.schema), serve, pg.dsn),
            KeyRing(serve),
            deleter=erasing_deleter(sinks, "test", min_days),
        )
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning"))  # fmt: skip
        return server, f"http://127.0.0.1:{port}/v1"

    def _run(self, pg: PgHarness, sinks: dict[str, Any], body: Any, min_days: float = 0) -> None:
        import threading

        import openai

        from .conftest import wait_until

        server, url = self._server(pg, sinks, min_days)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: server.started, 15, "the API server to start")
            body(openai.OpenAI(base_url=url, api_key="sk-local", max_retries=0))
        finally:
            server.should_exit = True
            thread.join(10)

    def test_delete_erases_the_record_from_every_configured_store(
        self, tmp_path: Path, moto_s3: MotoS3, pg_dsn: str
    ) -> None:
        events = population(12)
        pg, f, s = PgHarness(pg_dsn), FileHarness(tmp_path), S3Harness(moto_s3)
        for h in (pg, f, s):
            h.load(events)
        gone = events[5]["event_id"]
        before = {h.name: h.snapshot() for h in (pg, f, s)}

        def body(client: Any) -> None:
            deleted = client.chat.completions.delete("chatcmpl-5")
            assert deleted.deleted is True and deleted.id == "chatcmpl-5"

        self._run(pg, {"postgres": pg.config, "file": f.config, "s3": s.config}, body)
        for h in (pg, f, s):
            assert h.snapshot() == {k: v for k, v in before[h.name].items() if k != gone}

    def test_a_store_that_fails_makes_delete_answer_503_and_nothing_is_deleted(
        self, tmp_path: Path, moto_s3: MotoS3, pg_dsn: str
    ) -> None:
        import openai

        events = population(6)
        pg, f = PgHarness(pg_dsn), FileHarness(tmp_path)
        for h in (pg, f):
            h.load(events)
        broken = S3Harness(moto_s3, bucket="no-such-bucket-here")
        before = pg.snapshot()

        def body(client: Any) -> None:
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.delete("chatcmpl-2")
            assert err.value.status_code == 503
            error = err.value.body
            assert error["code"] == "store_unavailable" and "s3" in error["message"]
            assert "retry" in error["message"]
            assert client.chat.completions.retrieve("chatcmpl-2").id == "chatcmpl-2"

        sinks = {"postgres": pg.config, "file": f.config, "s3": broken.config}
        self._run(pg, sinks, body)
        assert pg.snapshot() == before

    def test_min_retention_days_makes_delete_of_a_young_record_answer_409(
        self, tmp_path: Path, pg_dsn: str
    ) -> None:
        """A record younger than min_retention_days stays (409 names the override command); an
        older one is deleted."""
        import openai

        now = time.time_ns() // 1_000_000
        young = population(3, base_ms=now - 86_400_000)
        old = population(3, base_ms=now - 400 * 86_400_000)
        for e in old:
            e["output"]["id"] = "old-" + e["output"]["id"]
        pg, f = PgHarness(pg_dsn), FileHarness(tmp_path)
        for h in (pg, f):
            h.load(young + old)

        def body(client: Any) -> None:
            with pytest.raises(openai.ConflictError) as err:
                client.chat.completions.delete("chatcmpl-1")
            assert err.value.status_code == 409
            error = err.value.body
            assert error["code"] == "retention_required"
            assert "min_retention_days (183 days)" in error["message"]
            assert f"--event-id {young[1]['event_id']} --override-retention" in error["message"]
            assert client.chat.completions.retrieve("chatcmpl-1").id == "chatcmpl-1"
            assert client.chat.completions.delete("old-chatcmpl-1").deleted is True

        self._run(pg, {"postgres": pg.config, "file": f.config}, body, min_days=183)
        assert set(f.snapshot()) == {e["event_id"] for e in young + old} - {old[1]["event_id"]}


class TestConfirmation:
    @pytest.mark.parametrize(("answer", "code"), [(b"erase\n", 1), (b"no\n", 5)])
    def test_on_a_terminal_it_shows_the_counts_and_asks(
        self, tmp_path: Path, answer: bytes, code: int
    ) -> None:
        """Typing `erase` erases (exit 1 here only because no Kafka takes the event); anything
        else refuses (exit 5) and changes nothing."""
        import pty

        h = FileHarness(tmp_path)
        events = population(12)
        h.load(events)
        before = h.snapshot()
        cfg = write_config(tmp_path / "c.toml", [h])
        primary, secondary = pty.openpty()
        env = {**os.environ, "AUDITPIPE_ERASURE_HASH_KEY": KEY}
        proc = subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "erase", "--config", str(cfg), "--user", "alice"],
            stdin=secondary, stdout=secondary, stderr=secondary, env=env,
        )  # fmt: skip
        os.close(secondary)
        seen = b""
        try:
            deadline = time.monotonic() + 30
            while b"Type 'erase' to proceed" not in seen:
                assert time.monotonic() < deadline, seen
                seen += os.read(primary, 4096)
            assert b"About to erase 4 record(s) matching user 'alice'" in seen
            assert b"file: 4 record(s) match" in seen
            os.write(primary, answer)
            assert proc.wait(30) == code
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(primary)
        doomed = {e["event_id"] for e in events if Selector("user", "alice").matches(e)}
        if code == 5:
            assert h.snapshot() == before
        else:
            assert h.snapshot() == {k: v for k, v in before.items() if k not in doomed}
