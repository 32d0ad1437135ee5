"""The sink contract (:class:`auditpipe.testing.SinkContract`) run over our own sinks.

Each installed entry point in ``auditpipe.sinks`` must have a ``SinkContract`` subclass here (a
test fails when one is missing), so a new sink cannot ship without passing the contract. The
contract's tests live in ``auditpipe.testing``, shipped with the package, so a third-party
sink's tests subclass the same class (test_testing.py runs it on a sink in a package of its
own).

MongoDB runs against ``mockupdb`` emulating an insert-only collection with duplicate-key
errors (no MongoDB server can be installed here); see test_mongodb_sink.py for the wire tests.
"""

from __future__ import annotations

import gzip
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditpipe.sinks import Sink, available_sinks, load_sink_class

from auditpipe.testing import SinkContract

from .sinkfixtures import FakeMongo, MotoS3


class TestStdoutSink(SinkContract):
    sink_name = "stdout"
    idempotent = False

    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.out = io.BytesIO()

    def make_sink(self) -> Sink[Any]:
        from auditpipe.sinks.stdout import StdoutSink

        return StdoutSink(stream=self.out)

    def stored_ids(self) -> list[str]:
        return [orjson.loads(x)["event_id"] for x in self.out.getvalue().splitlines()]


class TestFileSink(SinkContract):
    sink_name = "file"

    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path) -> None:
        self.path = tmp_path / "out" / "events.jsonl"

    def make_sink(self) -> Sink[Any]:
        return load_sink_class("file").from_mapping({"path": str(self.path), "max_bytes": 20_000})

    def stored_ids(self) -> list[str]:
        ids = []
        for p in sorted(self.path.parent.iterdir()):
            data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
            ids += [orjson.loads(x)["event_id"] for x in data.splitlines()]
        return ids


class TestS3Sink(SinkContract):
    sink_name = "s3"

    @pytest.fixture(autouse=True)
    def _store(self, moto_s3: MotoS3) -> None:
        self.moto = moto_s3
        self.bucket = moto_s3.new_bucket()

    def make_sink(self) -> Sink[Any]:
        return load_sink_class("s3").from_mapping(self.moto.sink_config(self.bucket))

    def stored_ids(self) -> list[str]:
        client: Any = self.moto.client()
        ids = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                ids += [orjson.loads(x)["event_id"] for x in gzip.decompress(body).splitlines()]
        return ids


class TestPostgresSink(SinkContract):
    sink_name = "postgres"

    @pytest.fixture(autouse=True)
    def _store(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn
        self.schema = f"c_{uuid.uuid4().hex[:10]}"

    def make_sink(self) -> Sink[Any]:
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


class TestMongoSink(SinkContract):
    sink_name = "mongodb"

    @pytest.fixture(autouse=True)
    def _store(self) -> Iterator[None]:
        self.fake = FakeMongo()
        yield
        self.fake.stop()

    def make_sink(self) -> Sink[Any]:
        return load_sink_class("mongodb").from_mapping(
            {"uri": self.fake.uri, "server_selection_timeout_secs": 5}
        )

    def stored_ids(self) -> list[str]:
        return list(self.fake.docs)


def test_every_registered_sink_runs_the_contract() -> None:
    """A sink registered in auditpipe.sinks without a SinkContract subclass here fails."""
    covered = {cls.sink_name for cls in SinkContract.__subclasses__()}
    missing = sorted(set(available_sinks()) - covered)
    assert not missing, f"registered sink(s) without a contract test: {missing}"


def test_the_sinks_with_a_schema_are_migratable() -> None:
    """Migratable is how the CLI and dev find a schema to create: postgres has one, file not."""
    from auditpipe.sinks import Migratable

    assert isinstance(load_sink_class("postgres").from_mapping({}), Migratable)
    assert not isinstance(load_sink_class("file").from_mapping({"path": "x.jsonl"}), Migratable)
