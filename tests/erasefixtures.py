"""Stores loaded with the same population of records, for the erasure tests.

Each harness writes the records through the sink itself, then reads back what the store holds,
per event id, in the store's own bytes (a file's line, an S3 object's line or Avro record, the
PostgreSQL rows as text, the MongoDB document), so a test can show that the records of others
are byte-identical after an erasure.

MongoDB: ``mockupdb`` only (no MongoDB server can be installed here), answering count
(``aggregate``) and ``delete`` by evaluating the filter the driver sends on its documents.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import io
import uuid
from pathlib import Path
from typing import Any

import fastavro
import orjson
import psycopg
from auditpipe.schemas import Event, new_event
from auditpipe.sinks import Batch, Sink
from auditpipe.sinks.file import FileSink
from auditpipe.sinks.mongodb import MongoSink
from auditpipe.sinks.postgres import TABLES, PostgresSink
from auditpipe.sinks.s3 import S3Sink

from .sinkfixtures import FakeMongo, MotoS3

BASE_MS = int(dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC).timestamp() * 1000)
USERS = ("alice", "bob", "carol")
TENANTS = ("acme", "globex")


def population(n: int = 60, base_ms: int = BASE_MS, step_ms: int = 600_000) -> list[Event]:
    """``n`` records of three users and two tenants over ``n * step_ms``. A quarter carry the
    user only in the caller metadata (as before enrichment); each holds a secret of its user."""
    out = []
    for i in range(n):
        user, tenant = USERS[i % 3], TENANTS[i % 2]
        meta = {"ticket": f"T-{i % 5}", "team": "red" if i % 2 else "blue"}
        fields: dict[str, Any] = {"user": user, "tenant": tenant}
        if i % 4 == 0:
            meta["user"] = user
            fields = {"tenant": tenant}
        out.append(
            new_event(
                request_id=f"req-{i}", model="m", endpoint="/v1/chat/completions",
                status_code=200, ts_ms=base_ms + i * step_ms, metadata=meta,
                input={"model": "m", "messages": [
                    {"role": "user", "content": f"{user}-secret-{i} lorem ipsum"}]},
                output={"id": f"chatcmpl-{i}", "model": "m", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": f"ok {i}"},
                     "finish_reason": "stop"}]},
                **fields,
            )
        )  # fmt: skip
    return out


class Harness:
    """A store under test: ``config`` builds its sink; ``load`` writes events through it in
    batches of ``chunk`` (0: one batch), as the runner would."""

    name = ""
    sink_class: type[Sink[Any]]
    chunk = 0
    config: dict[str, Any]

    def sink(self) -> Any:
        sink = self.sink_class.from_mapping(self.config)
        assert isinstance(sink, self.sink_class)
        return sink

    def load(self, events: list[Event]) -> None:
        async def run() -> None:
            sink = self.sink()
            await sink.start()
            try:
                step = self.chunk or max(len(events), 1)
                for i in range(0, len(events), step):
                    chunk = events[i : i + step]
                    await sink.write(Batch(chunk, "audit.events", 0, range(i, i + len(chunk))))
            finally:
                await sink.stop()

        asyncio.run(run())


class FileHarness(Harness):
    sink_class = FileSink
    chunk = 4
    name = "file"

    def __init__(self, tmp: Path, **extra: Any) -> None:
        self.dir = tmp / f"files-{uuid.uuid4().hex[:6]}"
        self.config = {
            "path": str(self.dir / "audit.jsonl"), "max_bytes": 6000, "backups": 1000, **extra,
        }  # fmt: skip

    def files(self) -> list[Path]:
        return self.sink().data_files()

    def snapshot(self) -> dict[str, bytes]:
        out = {}
        for f in self.files():
            data = f.read_bytes()
            if f.name.endswith(".gz"):
                data = gzip.decompress(data)
            for line in data.splitlines():
                out[orjson.loads(line)["event_id"]] = line
        return out

    def raw_bytes(self) -> bytes:
        """Every byte on disk in the directory, decompressed where gzipped."""
        out = b""
        for f in sorted(self.dir.iterdir()):
            data = f.read_bytes()
            out += gzip.decompress(data) if f.name.endswith(".gz") else data
        return out


class S3Harness(Harness):
    sink_class = S3Sink
    chunk = 5
    name = "s3"

    def __init__(self, moto: MotoS3, bucket: str | None = None, **extra: Any) -> None:
        self.moto = moto
        self.bucket = bucket or moto.new_bucket()
        self.config = moto.sink_config(self.bucket, **extra)

    def objects(self) -> dict[str, bytes]:
        client: Any = self.moto.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=self.bucket, Key=obj["Key"])[
                    "Body"
                ].read()
        return out

    def all_versions_bytes(self) -> bytes:
        """Every stored version of every object, decompressed where gzipped."""
        client: Any = self.moto.client()
        out = b""
        for page in client.get_paginator("list_object_versions").paginate(Bucket=self.bucket):
            for v in page.get("Versions", []):
                got = client.get_object(Bucket=self.bucket, Key=v["Key"], VersionId=v["VersionId"])
                body = got["Body"].read()
                out += gzip.decompress(body) if v["Key"].endswith(".gz") else body
        return out

    def snapshot(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key, body in self.objects().items():
            if key.endswith(".jsonl.gz"):
                for line in gzip.decompress(body).splitlines():
                    out[orjson.loads(line)["event_id"]] = line
            elif key.endswith(".avro"):
                for rec in fastavro.reader(io.BytesIO(body)):
                    out[rec["event_id"]] = orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)
            else:
                out[orjson.loads(body)["event_id"]] = body
        return out


class PgHarness(Harness):
    sink_class = PostgresSink
    chunk = 0
    name = "postgres"

    def __init__(self, dsn: str, **extra: Any) -> None:
        self.dsn = dsn
        self.schema = f"e_{uuid.uuid4().hex[:10]}"
        self.config = {"dsn": dsn, "schema_name": self.schema, "auto_migrate": True, **extra}

    def snapshot(self) -> dict[str, bytes]:
        rows: dict[str, list[str]] = {}
        with psycopg.connect(self.dsn) as conn:
            for table in TABLES:
                for eid, text in conn.execute(
                    f'SELECT id, t::text FROM "{self.schema}".{table} t ORDER BY id'  # type: ignore[arg-type]
                ):
                    rows.setdefault(eid, []).append(f"{table}:{text}")
        return {eid: "\n".join(v).encode() for eid, v in rows.items()}


class MongoHarness(Harness):
    sink_class = MongoSink
    chunk = 0
    name = "mongodb"

    def __init__(self, fake: FilteringMongo, **extra: Any) -> None:
        self.fake = fake
        self.config = {"uri": fake.uri, "server_selection_timeout_secs": 5, **extra}

    def snapshot(self) -> dict[str, bytes]:
        import bson

        return {k: bson.encode(v) for k, v in self.fake.docs.items()}


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def mongo_match(doc: dict[str, Any], flt: dict[str, Any]) -> bool:
    """The subset of MongoDB's query language the mongodb sink's selector filters use."""
    for key, cond in flt.items():
        if key == "$and":
            if not all(mongo_match(doc, c) for c in cond):
                return False
        elif key == "$or":
            if not any(mongo_match(doc, c) for c in cond):
                return False
        elif isinstance(cond, dict) and any(k.startswith("$") for k in cond):
            value = _get(doc, key)
            for op, arg in cond.items():
                if value is None:
                    return False
                if (op == "$gte" and not value >= arg) or (op == "$lt" and not value < arg):
                    return False
                if op not in ("$gte", "$lt"):
                    raise AssertionError(f"operator {op} not modelled")
        elif _get(doc, key) != cond:
            return False
    return True


class FilteringMongo(FakeMongo):
    """FakeMongo that also answers count_documents (aggregate $match/$group) and delete."""

    def _handle(self, req: Any) -> bool:
        name = req.command_name
        if name == "aggregate":
            self.commands.append(dict(req.doc))
            pipeline = list(req.doc["pipeline"])
            flt = pipeline[0].get("$match", {}) if pipeline else {}
            n = sum(mongo_match(d, flt) for d in self.docs.values())
            ns = f"{req.doc['$db']}.{req.doc['aggregate']}"
            batch = [{"_id": 1, "n": n}] if n else []
            return bool(req.reply({"ok": 1, "cursor": {"id": 0, "ns": ns, "firstBatch": batch}}))
        if name == "delete":
            self.commands.append(dict(req.doc))
            deletes = req.doc.get("deletes")
            if deletes is None:
                deletes = list(req.docs[1:])
            n = 0
            for spec in deletes:
                doomed = [k for k, d in self.docs.items() if mongo_match(d, spec["q"])]
                for k in doomed:
                    del self.docs[k]
                n += len(doomed)
            return bool(req.reply({"ok": 1, "n": n}))
        return super()._handle(req)
