"""The postgres sink on a real PostgreSQL (the machine's, or a throwaway cluster)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from auditpipe.sinks import postgres
from auditpipe.sinks.postgres import PostgresSink
from auditpipe.sinks.runner import SinkRunner

from auditpipe.dlq import H_REASON, H_STAGE, headers_dict
from auditpipe.errors import ConfigError
from auditpipe.settings import Settings

from .kafkautil import consume
from .sinkfixtures import PgCluster
from .sinkutil import committed, fast, make_events, produce_events, wait_for


def pg_sink(dsn: str, schema: str, **extra: Any) -> PostgresSink:
    sink = PostgresSink.from_mapping({"dsn": dsn, "schema_name": schema, **extra})
    assert isinstance(sink, PostgresSink)
    return sink


def new_schema() -> str:
    return f"s_{uuid.uuid4().hex[:10]}"


def query(dsn: str, sql: str) -> list[Any]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def settings_file(path: Path, dsn: str, schema: str) -> Path:
    path.write_text(f'[sinks.postgres]\ndsn = "{dsn}"\nschema_name = "{schema}"\n')
    return path


async def _write(sink: PostgresSink, events: list[Any]) -> None:
    await sink.start()
    try:
        await sink.write(events)
    finally:
        await sink.stop()


class TestMigrate:
    def test_cli_migrate_creates_the_schema_idempotently(self, pg_dsn: str, tmp_path: Path) -> None:
        """`auditpipe sink postgres --migrate` creates the four tables; running it again is fine."""
        schema = new_schema()
        cfg = settings_file(tmp_path / "a.toml", pg_dsn, schema)
        cli = [sys.executable, "-m", "auditpipe", "sink", "postgres", "--migrate", "--config"]
        for _ in range(2):
            out = subprocess.run([*cli, str(cfg)], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
        tables = query(
            pg_dsn,
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            f"WHERE table_schema = '{schema}'",
        )
        types = {(t, c): d for t, c, d in tables}
        assert {t for t, _ in types} == {"requests", "responses", "errors", "metadata",
                                          "api_changes"}  # fmt: skip
        assert types[("metadata", "api_metadata")] == "jsonb"  # the read side's additions
        assert types[("requests", "id")] == "text"
        assert types[("requests", "timestamp")] == "timestamp with time zone"
        assert types[("requests", "raw_request")] == "jsonb"
        assert types[("responses", "raw_response")] == "jsonb"
        assert types[("metadata", "metadata")] == "jsonb"

    def test_an_older_schema_is_upgraded_in_place(self, pg_dsn: str) -> None:
        """The read side's additions are created on a database migrated before them."""
        schema = new_schema()
        sink = pg_sink(pg_dsn, schema)
        asyncio.run(sink.migrate())
        asyncio.run(_write(sink, make_events(3)))
        with psycopg.connect(pg_dsn) as conn:  # back to the schema as it was before them
            conn.execute(f'DROP TABLE "{schema}".api_changes')
            conn.execute(f'DROP INDEX "{schema}".metadata_caller_metadata_idx')
            conn.execute(f'ALTER TABLE "{schema}".metadata DROP COLUMN api_metadata')
        asyncio.run(pg_sink(pg_dsn, schema).migrate())
        assert query(pg_dsn, f'SELECT count(*) FROM "{schema}".metadata '
                     "WHERE api_metadata IS NULL") == [(3,)]  # fmt: skip
        assert query(pg_dsn, f'SELECT count(*) FROM "{schema}".api_changes') == [(0,)]

    def test_start_without_migration_says_how_to_migrate(self, pg_dsn: str) -> None:
        with pytest.raises(ConfigError, match="--migrate"):
            asyncio.run(pg_sink(pg_dsn, new_schema()).start())

    def test_unreachable_database_names_the_key(self) -> None:
        sink = pg_sink("postgresql://postgres@127.0.0.1:1/x", "s", connect_timeout_secs=1)
        with pytest.raises(Exception, match=r"sinks\.postgres\.dsn"):
            asyncio.run(sink.start())


class TestWrite:
    def test_events_map_onto_requests_responses_errors_and_metadata(self, pg_dsn: str) -> None:
        schema = new_schema()
        ok, failed = make_events(2)
        failed.update(status_code=500, output=None, error={"type": "upstream", "message": "boom"})

        async def scenario() -> None:
            sink = pg_sink(pg_dsn, schema, auto_migrate=True)
            await sink.start()
            try:
                await sink.write([ok, failed])
                await sink.write([ok, failed])  # redelivery: no-op
            finally:
                await sink.stop()

        asyncio.run(scenario())
        req = query(
            pg_dsn,
            f'SELECT id, request_id, model, parameters, inputs, raw_request, "timestamp" '
            f'FROM "{schema}".requests ORDER BY request_id',
        )
        assert [r[0] for r in req] == [ok["event_id"], failed["event_id"]]
        assert req[0][3] == {"model": "m", "temperature": 0.2}
        assert req[0][4] == ok["input"]["messages"]
        assert req[0][5] == ok["input"]
        assert int(req[0][6].timestamp() * 1000) == ok["ts_ms"]
        resp = query(
            pg_dsn, f'SELECT id, model_name, model_version, raw_response FROM "{schema}".responses'
        )
        assert resp == [(ok["event_id"], "m", "m-2024", ok["output"])]
        errs = query(pg_dsn, f'SELECT id, error FROM "{schema}".errors')
        assert errs == [(failed["event_id"], "upstream: boom")]
        meta = query(pg_dsn, f'SELECT metadata FROM "{schema}".metadata ORDER BY id')
        assert meta[0][0]["metadata"] == ok["metadata"] and "input" not in meta[0][0]
        assert meta[0][0]["usage"] == ok["usage"]

    def test_the_binary_copy_stores_what_the_staging_path_stores(
        self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The fast path (binary COPY into the tables) builds every row as the staging SQL does,
        over odd shapes too; a redelivered batch then takes the staging path and is a no-op."""
        evs = make_events(19)
        evs[1].update(status_code=500, output=None, error={"type": "upstream", "message": "boom"})
        evs[2].update(status_code=404, output={"output": [{"type": "message"}], "id": "x"})
        evs[3].update(input="a bare prompt", output="a bare answer", status_code=None)
        evs[4].update(input={"messages": None, "prompt": "p", "n": 2}, latency_ms=None)
        evs[5].update(input={"temperature": 1}, output={"model": None}, ttft_ms=3.25)
        evs[6].update(usage={"prompt_tokens": 3, "completion_tokens": None, "total_tokens": None})
        evs[7].update(latency_ms=12.3456789, ts_ms=1796227365055, stream=True)
        evs[8].update(error={"type": "timeout", "message": None}, status_code=504)
        evs[9].update(error={"type": "cancelled", "message": "client left"}, status_code=None)
        evs[10].update(request_id="r-ünï-😀", input={"messages": [{"content": "héllo \t\n\\ 😀"}]})
        evs[11].update(output=[0.25, -1.5], endpoint="/v1/embeddings", model=None)
        evs[12].update(metadata={"ticket": "T-1", "nested": "a\\b"}, status_code=400, error=None)
        oip_in = {"id": "1", "parameters": {"t": 1}, "inputs": [{"name": "x", "data": [1]}],
                  "outputs": [{"name": "y"}]}  # fmt: skip
        oip_out = {"model_name": "iris", "model_version": "3", "parameters": {"ms": 1, "usage": 0},
                   "outputs": [{"name": "y", "data": [2]}]}  # fmt: skip
        evs[13].update(endpoint="/v2/models/iris/infer", input=oip_in, output=oip_out)
        evs[14].update(endpoint="/v2/models/iris/versions/7/infer", input={"inputs": []},
                       output={"model_name": "iris", "outputs": []})  # fmt: skip
        gen_out = {"model_name": None, "text_output": "HI", "parameters": [1]}
        evs[15].update(endpoint="/v2/models/g/generate", input={"text_input": "hi"}, output=gen_out)
        evs[16].update(input={"inputs": None, "parameters": None},
                       output={"model_version": None, "model": "m-x"})  # fmt: skip
        evs[17].update(endpoint="/v2/models/m/versions/2/infer", output=["a"], usage=None)
        evs[18].update(endpoint="/v2/models/m/versions/2/infer", output={"model": None})

        def load(schema: str) -> dict[str, list[Any]]:
            async def scenario() -> None:
                sink = pg_sink(pg_dsn, schema, auto_migrate=True, write_concurrency=1)
                await sink.start()
                try:
                    await sink.write(evs)
                    await sink.write(evs[:5])  # redelivered: the staging path, a no-op
                finally:
                    await sink.stop()

            asyncio.run(scenario())
            return {
                t: query(pg_dsn, f'SELECT * FROM "{schema}".{t} ORDER BY id')
                for t in ("requests", "responses", "errors", "metadata")
            }

        assert set(postgres._copy_rows(evs)) == {"requests", "responses", "errors", "metadata"}
        fast_rows = load(new_schema())

        def staging_only(events: Any) -> dict[str, bytes]:
            raise postgres._Unusual

        monkeypatch.setattr(postgres, "_copy_rows", staging_only)
        staged_rows = load(new_schema())
        assert fast_rows == staged_rows
        assert [len(fast_rows[t]) for t in ("requests", "responses", "errors")] == [19, 18, 5]
        versions = {r[0]: r[2] for r in fast_rows["responses"]}
        assert [versions[e["event_id"]] for e in evs[13:19]] == ["3", "7", None, "m-x", "2", "2"]
        with pytest.raises(postgres._Unusual):  # a number read as text: the staging path's job
            postgres._copy_rows([{**evs[13], "output": {"model_version": 3}}])

    def test_retention_deletes_old_requests_and_their_rows(self, pg_dsn: str) -> None:
        schema = new_schema()
        old = make_events(1, ts_ms=int((time.time() - 40 * 86400) * 1000))
        new = make_events(1)

        async def scenario() -> int:
            sink = pg_sink(pg_dsn, schema, auto_migrate=True, retention_days=30)
            await sink.start()
            try:
                await sink.write(old + new)
                return await sink.prune()
            finally:
                await sink.stop()

        assert asyncio.run(scenario()) == 1
        for table in ("requests", "responses", "metadata"):
            rows = query(pg_dsn, f'SELECT id FROM "{schema}".{table}')
            assert rows == [(new[0]["event_id"],)], table


class TestFaults:
    def test_a_rejected_record_is_dead_lettered_and_the_rest_written(
        self, pg_dsn: str, settings: Settings
    ) -> None:
        """PostgreSQL refuses \\u0000 in JSONB: that event is dead-lettered, the rest stored."""
        schema = new_schema()
        evs = make_events(20)
        evs[7]["input"] = {"messages": [{"role": "user", "content": "nul \x00 byte"}]}
        s = fast(settings, max_events=20, max_wait_secs=1.0)

        async def scenario() -> list[Any]:
            await produce_events(s, evs)
            runner = SinkRunner(pg_sink(pg_dsn, schema, auto_migrate=True), s)
            task = asyncio.create_task(runner.run())
            try:
                await wait_for(
                    lambda: runner.stats.written + runner.stats.dead_lettered >= len(evs),
                    60, "all events handled",
                )  # fmt: skip
            finally:
                runner.stop()
                await asyncio.wait_for(task, 30)
            assert runner.stats.dead_lettered == 1
            assert await committed(s, runner.group_id) == len(evs)
            return await consume(s.kafka.bootstrap or "", s.kafka.dlq_topic, 1)

        (dead,) = asyncio.run(scenario())
        headers = headers_dict(dead.headers)
        assert headers[H_STAGE] == "sink:postgres" and headers[H_REASON] == "rejected"
        assert "\\u0000" in headers["auditpipe.dlq.error_message"]
        ids = {r[0] for r in query(pg_dsn, f'SELECT id FROM "{schema}".requests')}
        assert ids == {e["event_id"] for i, e in enumerate(evs) if i != 7}


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A throwaway cluster this test may restart (never the machine's own server)."""
    c = PgCluster()
    c.start()
    try:
        yield c
    finally:
        c.destroy()


class TestRestart:
    def test_postgresql_restarted_under_load_loses_nothing(
        self, cluster: PgCluster, settings: Settings
    ) -> None:
        """Stop PostgreSQL while events stream in, start it again: every event arrives once."""
        schema = new_schema()
        evs = make_events(1500)
        s = fast(settings, max_events=100, backoff_initial_secs=0.05, backoff_max_secs=0.5)
        sink = pg_sink(cluster.dsn, schema, auto_migrate=True, connect_timeout_secs=1)

        async def scenario() -> SinkRunner:
            runner = SinkRunner(sink, s)
            task = asyncio.create_task(runner.run())
            try:
                await produce_events(s, evs[:500])
                await wait_for(lambda: runner.stats.written >= 100, 60, "first writes")
                await asyncio.to_thread(cluster.stop, "immediate")
                await produce_events(s, evs[500:])
                await wait_for(lambda: runner.stats.retried >= 2, 60, "failed writes")
                await asyncio.to_thread(cluster.start)
                await wait_for(lambda: runner.stats.written >= len(evs), 90, "all written")
            finally:
                runner.stop()
                await asyncio.wait_for(task, 30)
            assert await committed(s, runner.group_id) == len(evs)
            return runner

        asyncio.run(scenario())
        rows = query(cluster.dsn, f'SELECT id FROM "{schema}".requests')
        assert len(rows) == len(evs) and {r[0] for r in rows} == {e["event_id"] for e in evs}
        assert os.path.isdir(cluster.data)
