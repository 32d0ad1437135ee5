"""The mongodb sink at the wire level, and against a real server when one is given.

No MongoDB server can be installed on these machines, so the tests run PyMongo's async client
against ``mockupdb``: the driver really speaks the wire protocol (OP_MSG) to a socket, and the
tests assert the commands it sends (createIndexes, insert with ordered=false, the write
concern) and how the sink classifies the server's answers. ``TestRealServer`` runs the same
behaviour against a real MongoDB when ``AUDITPIPE_TEST_MONGODB_URL`` is set (docker compose),
and is skipped otherwise: the one allowed skip.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from auditpipe.sinks import PermanentSinkError, RetriableSinkError
from auditpipe.sinks.mongodb import MongoSink

from auditpipe.errors import ConfigError

from .sinkfixtures import FakeMongo, inserted_documents
from .sinkutil import make_events, write_batches


@pytest.fixture
def fake() -> Iterator[FakeMongo]:
    server = FakeMongo()
    try:
        yield server
    finally:
        server.stop()


def mongo_sink(uri: str, **extra: Any) -> MongoSink:
    sink = MongoSink.from_mapping({"uri": uri, "server_selection_timeout_secs": 5, **extra})
    assert isinstance(sink, MongoSink)
    return sink


def commands(fake: FakeMongo, name: str) -> list[dict[str, Any]]:
    return [c for c in fake.commands if name in c]


class TestWire:
    def test_start_creates_time_ttl_model_request_and_metadata_indexes(
        self, fake: FakeMongo
    ) -> None:
        sink = mongo_sink(fake.uri, retention_days=30, metadata_index_keys=["ticket", "team"])
        asyncio.run(write_batches(sink))
        (cmd,) = commands(fake, "createIndexes")
        assert cmd["createIndexes"] == "events" and cmd["$db"] == "auditpipe"
        specs = {ix["name"]: ix for ix in cmd["indexes"]}
        assert dict(specs["ts_ttl"]["key"]) == {"ts": 1}
        assert specs["ts_ttl"]["expireAfterSeconds"] == 30 * 86400
        assert dict(specs["model_ts"]["key"]) == {"model": 1, "ts": 1}
        assert dict(specs["request_id"]["key"]) == {"request_id": 1}
        assert dict(specs["metadata.ticket"]["key"]) == {"metadata.ticket": 1}
        assert dict(specs["metadata.team"]["key"]) == {"metadata.team": 1}

    def test_write_is_one_unordered_insert_keyed_by_event_id_with_the_write_concern(
        self, fake: FakeMongo
    ) -> None:
        evs = make_events(25)
        sink = mongo_sink(fake.uri, write_concern_w=2, operation_timeout_secs=7, database="audit")
        asyncio.run(write_batches(sink, evs))
        (cmd,) = commands(fake, "insert")
        assert cmd["insert"] == "events" and cmd["$db"] == "audit"
        assert cmd["ordered"] is False
        assert dict(cmd["writeConcern"]) == {"w": 2, "j": True}
        assert 0 < cmd["maxTimeMS"] <= 7000  # operation_timeout_secs bounds the server's work
        docs = fake.docs
        assert list(docs) == [e["event_id"] for e in evs]
        first = docs[evs[0]["event_id"]]
        assert first["request_id"] == "r0" and first["input"] == evs[0]["input"]
        ts = first["ts"].replace(tzinfo=dt.UTC) if first["ts"].tzinfo is None else first["ts"]
        assert int(ts.timestamp() * 1000) == evs[0]["ts_ms"]

    def test_duplicate_keys_count_as_success(self, fake: FakeMongo) -> None:
        """Redelivery: the server answers E11000 for every document; the write succeeds."""
        evs = make_events(5)
        asyncio.run(write_batches(mongo_sink(fake.uri), evs, evs))
        assert len(commands(fake, "insert")) == 2 and len(fake.docs) == 5

    def test_write_concern_error_is_retriable(self, fake: FakeMongo) -> None:
        fake.insert_reply = lambda req: {
            "ok": 1, "n": len(inserted_documents(req)),
            "writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"},
        }  # fmt: skip
        with pytest.raises(RetriableSinkError):
            asyncio.run(write_batches(mongo_sink(fake.uri), make_events(3)))

    def test_document_validation_failure_is_permanent(self, fake: FakeMongo) -> None:
        fake.insert_reply = lambda req: {
            "ok": 1, "n": 0,
            "writeErrors": [{"index": 0, "code": 121, "errmsg": "Document failed validation"}],
        }  # fmt: skip
        with pytest.raises(PermanentSinkError, match="validation"):
            asyncio.run(write_batches(mongo_sink(fake.uri), make_events(1)))

    def test_unreachable_server_is_retriable(self) -> None:
        sink = mongo_sink("mongodb://127.0.0.1:1", server_selection_timeout_secs=0.5)
        with pytest.raises(RetriableSinkError, match=r"sinks\.mongodb\.uri"):
            asyncio.run(sink.start())

    def test_bad_config_names_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"sinks\.mongodb\.retention_days"):
            MongoSink.from_mapping({"retention_days": -1})


REAL = os.environ.get("AUDITPIPE_TEST_MONGODB_URL")


@pytest.mark.skipif(not REAL, reason="AUDITPIPE_TEST_MONGODB_URL is not set (no MongoDB here)")
class TestRealServer:
    def test_insert_redeliver_and_indexes(self) -> None:
        from pymongo import AsyncMongoClient

        db = f"auditpipe_test_{uuid.uuid4().hex[:8]}"
        evs = make_events(20)
        sink = mongo_sink(REAL or "", database=db, retention_days=1, metadata_index_keys=["x"])

        async def scenario() -> tuple[int, set[str]]:
            await write_batches(sink, evs, evs)
            client: Any = AsyncMongoClient(REAL)
            try:
                coll = client[db]["events"]
                count = await coll.count_documents({})
                names = {ix["name"] async for ix in await coll.list_indexes()}
                await client.drop_database(db)
                return count, names
            finally:
                await client.close()

        count, names = asyncio.run(scenario())
        assert count == 20
        assert {"ts_ttl", "model_ts", "request_id", "metadata.x"} <= names
