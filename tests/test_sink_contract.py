"""The sink contract, run over every registered sink against its real store.

Each installed entry point in ``auditpipe.sinks`` must have a harness here (a test fails
when one is missing), so a new sink cannot ship without passing the contract:

- its config rejects an unknown key, naming it;
- ``stop()`` is safe without ``start()`` and twice;
- a batch written twice (redelivery) is stored once (sinks that promise idempotence);
- under the runner, every produced event is stored and the offsets are committed.

MongoDB runs against ``mockupdb`` emulating an insert-only collection with duplicate-key
errors (no MongoDB server can be installed here); see test_mongodb_sink.py for the wire tests.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditpipe.sinks import Batch, Sink, available_sinks, load_sink_class
from auditpipe.sinks.runner import SinkRunner

from auditpipe.errors import ConfigError
from auditpipe.settings import Settings

from .sinkfixtures import FakeMongo, MotoS3
from .sinkutil import committed, fast, make_events, produce_events, run_until


class Harness:
    idempotent = True

    def make(self) -> Sink:
        raise NotImplementedError

    def stored_ids(self) -> list[str]:
        """Every stored event id, duplicates included."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class StdoutHarness(Harness):
    idempotent = False

    def __init__(self, **_: Any) -> None:
        self.out = io.BytesIO()

    def make(self) -> Sink:
        from auditpipe.sinks.stdout import StdoutSink

        return StdoutSink(stream=self.out)

    def stored_ids(self) -> list[str]:
        return [orjson.loads(x)["event_id"] for x in self.out.getvalue().splitlines()]


class FileHarness(Harness):
    def __init__(self, tmp_path: Path, **_: Any) -> None:
        self.path = tmp_path / "out" / "events.jsonl"

    def make(self) -> Sink:
        return load_sink_class("file").from_mapping({"path": str(self.path), "max_bytes": 20_000})

    def stored_ids(self) -> list[str]:
        ids = []
        for p in sorted(self.path.parent.iterdir()):
            data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
            ids += [orjson.loads(x)["event_id"] for x in data.splitlines()]
        return ids


class S3Harness(Harness):
    def __init__(self, moto: MotoS3, **_: Any) -> None:
        self.moto = moto
        self.bucket = moto.new_bucket()

    def make(self) -> Sink:
        return load_sink_class("s3").from_mapping(self.moto.sink_config(self.bucket))

    def stored_ids(self) -> list[str]:
        client: Any = self.moto.client()
        ids = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                ids += [orjson.loads(x)["event_id"] for x in gzip.decompress(body).splitlines()]
        return ids


class PostgresHarness(Harness):
    def __init__(self, dsn: str, **_: Any) -> None:
        self.dsn = dsn
        self.schema = f"c_{uuid.uuid4().hex[:10]}"

    def make(self) -> Sink:
        return load_sink_class("postgres").from_mapping(
            {"dsn": self.dsn, "schema_name": self.schema, "auto_migrate": True}
        )

    def stored_ids(self) -> list[str]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(f'SELECT id FROM "{self.schema}".requests').fetchall()
            meta = conn.execute(f'SELECT count(*) FROM "{self.schema}".metadata').fetchone()
        assert meta and meta[0] == len(rows), "every request has its metadata row"
        return [r[0] for r in rows]


class MongoHarness(Harness):
    def __init__(self, **_: Any) -> None:
        self.fake = FakeMongo()

    def make(self) -> Sink:
        return load_sink_class("mongodb").from_mapping(
            {"uri": self.fake.uri, "server_selection_timeout_secs": 5}
        )

    def stored_ids(self) -> list[str]:
        return list(self.fake.docs)

    def close(self) -> None:
        self.fake.stop()


HARNESSES: dict[str, type[Harness]] = {
    "stdout": StdoutHarness,
    "file": FileHarness,
    "s3": S3Harness,
    "postgres": PostgresHarness,
    "mongodb": MongoHarness,
}


@pytest.fixture(params=sorted(available_sinks()))
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, moto_s3: MotoS3, pg_dsn: str
) -> Iterator[tuple[str, Harness]]:
    name = request.param
    assert name in HARNESSES, f"sink {name!r} is registered but has no contract harness"
    h = HARNESSES[name](tmp_path=tmp_path, moto=moto_s3, dsn=pg_dsn)
    try:
        yield name, h
    finally:
        h.close()


class TestSinkContract:
    def test_config_rejects_an_unknown_key_naming_it(self, harness: tuple[str, Harness]) -> None:
        """`[sinks.NAME] bogus_key = 1` is a ConfigError that names sinks.NAME.bogus_key."""
        name, _ = harness
        with pytest.raises(ConfigError, match=rf"sinks\.{name}\.bogus_key"):
            load_sink_class(name).from_mapping({"bogus_key": 1})

    def test_stop_is_safe_without_start_and_twice(self, harness: tuple[str, Harness]) -> None:
        """stop() before start() and a second stop() do nothing and raise nothing."""
        _, h = harness

        async def scenario() -> None:
            sink = h.make()
            await sink.stop()
            await sink.start()
            await sink.stop()
            await sink.stop()

        asyncio.run(scenario())

    def test_a_redelivered_batch_is_stored_once(self, harness: tuple[str, Harness]) -> None:
        """The same batch (same source offsets) written twice leaves each event once."""
        _, h = harness
        evs = make_events(30)
        batch = Batch(evs, "t", 0, list(range(100, 130)))

        async def scenario() -> None:
            sink = h.make()
            await sink.start()
            try:
                await sink.write(batch)
                await sink.write(batch)
            finally:
                await sink.stop()

        asyncio.run(scenario())
        ids = h.stored_ids()
        assert set(ids) == {e["event_id"] for e in evs}
        if h.idempotent:
            assert len(ids) == len(evs), "a redelivered batch created duplicates"

    def test_runner_stores_every_event_and_commits(
        self, harness: tuple[str, Harness], settings: Settings
    ) -> None:
        """Under the runner, N produced events are stored and N offsets committed."""
        _, h = harness
        evs = make_events(120)
        s = fast(settings, max_events=50)

        async def scenario() -> int:
            await produce_events(s, evs)
            runner = SinkRunner(h.make(), s)
            await run_until(runner, lambda: runner.stats.written >= len(evs))
            return await committed(s, runner.group_id)

        assert asyncio.run(scenario()) == len(evs)
        ids = h.stored_ids()
        assert sorted(set(ids)) == sorted(e["event_id"] for e in evs)
        if h.idempotent:
            assert len(ids) == len(evs)
