"""The s3 sink against a real moto S3 server over HTTP (path-style, like MinIO)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import io
from collections.abc import Iterator
from typing import Any

import fastavro
import orjson
import pytest
from auditpipe.sinks import Batch, RetriableSinkError
from auditpipe.sinks.runner import SinkRunner
from auditpipe.sinks.s3 import S3Sink

from auditpipe.errors import ConfigError
from auditpipe.settings import Settings

from .sinkfixtures import MotoS3
from .sinkutil import committed, fast, make_events, produce_events, wait_for, write_batches

HOUR10 = int(dt.datetime(2026, 11, 23, 10, 59, 0, tzinfo=dt.UTC).timestamp() * 1000)
HOUR11 = HOUR10 + 120_000  # 11:01


def s3_sink(moto: MotoS3, bucket: str, **extra: Any) -> S3Sink:
    sink = S3Sink.from_mapping(moto.sink_config(bucket, **extra))
    assert isinstance(sink, S3Sink)
    return sink


def objects(moto: MotoS3, bucket: str) -> dict[str, bytes]:
    client: Any = moto.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def jsonl_ids(objs: dict[str, bytes]) -> list[str]:
    ids = []
    for body in objs.values():
        ids += [orjson.loads(x)["event_id"] for x in gzip.decompress(body).splitlines()]
    return ids


class TestLayout:
    def test_objects_are_partitioned_by_event_hour_and_named_by_first_offset(
        self, moto_s3: MotoS3
    ) -> None:
        """A batch spanning two hours -> one object per hour, named topic-partition-offset."""
        bucket = moto_s3.new_bucket()
        evs = make_events(3, ts_ms=HOUR10) + make_events(2, ts_ms=HOUR11)
        evs[1]["ts_ms"] = HOUR11  # out of order in event time
        batch = Batch(evs, "audit.events", 2, [100, 101, 102, 103, 104])
        asyncio.run(write_batches(s3_sink(moto_s3, bucket, prefix="logs/prod"), batch))
        objs = objects(moto_s3, bucket)
        assert sorted(objs) == [
            "logs/prod/dt=2026-11-23/hour=10/audit.events-2-00000000000000000100.jsonl.gz",
            "logs/prod/dt=2026-11-23/hour=11/audit.events-2-00000000000000000101.jsonl.gz",
        ]
        hour10 = next(v for k, v in objs.items() if "hour=10" in k)
        lines = [orjson.loads(x) for x in gzip.decompress(hour10).splitlines()]
        assert [e["event_id"] for e in lines] == [evs[0]["event_id"], evs[2]["event_id"]]
        assert lines[0]["input"] == evs[0]["input"]  # the JSON rendering, objects not text

    def test_a_redelivered_batch_overwrites_the_same_objects(self, moto_s3: MotoS3) -> None:
        """After a crash the batch comes again (maybe cut shorter): no event is stored twice."""
        bucket = moto_s3.new_bucket()
        evs = make_events(10, ts_ms=HOUR10)
        full = Batch(evs, "t", 0, list(range(50, 60)))
        asyncio.run(
            write_batches(s3_sink(moto_s3, bucket), full, full.slice(0, 4), full.slice(4, 10))
        )
        ids = jsonl_ids(objects(moto_s3, bucket))
        assert sorted(ids) == sorted(e["event_id"] for e in evs)

    @pytest.mark.parametrize("codec", ["deflate", "zstandard"])
    def test_avro_container_files(self, moto_s3: MotoS3, codec: str) -> None:
        """format = "avro": a container file with the AuditEvent schema, readable by fastavro."""
        bucket = moto_s3.new_bucket()
        evs = make_events(5, ts_ms=HOUR10)
        asyncio.run(write_batches(s3_sink(moto_s3, bucket, format="avro", avro_codec=codec), evs))
        ((key, body),) = objects(moto_s3, bucket).items()
        assert key.endswith(f"/batch-{evs[0]['event_id']}.avro")  # a plain list: no offsets
        reader = fastavro.reader(io.BytesIO(body))
        assert reader.codec == codec
        records = list(reader)
        assert [r["event_id"] for r in records] == [e["event_id"] for e in evs]
        assert orjson.loads(records[0]["input"]) == evs[0]["input"]

    def test_per_event_mode_writes_one_json_object_per_event(self, moto_s3: MotoS3) -> None:
        """mode = "per_event": PREFIX/dt=.../hour=HH/<event_id>.json (the F5 layout)."""
        bucket = moto_s3.new_bucket()
        evs = make_events(4, ts_ms=HOUR11)
        asyncio.run(write_batches(s3_sink(moto_s3, bucket, mode="per_event"), evs, evs))
        objs = objects(moto_s3, bucket)
        assert sorted(objs) == sorted(
            f"auditpipe/dt=2026-11-23/hour=11/{e['event_id']}.json" for e in evs
        )
        for e in evs:
            body = objs[f"auditpipe/dt=2026-11-23/hour=11/{e['event_id']}.json"]
            assert orjson.loads(body) == orjson.loads(orjson.dumps(e))

    def test_server_side_encryption_and_object_lock_retention(self, moto_s3: MotoS3) -> None:
        bucket = moto_s3.new_bucket(object_lock=True)
        sink = s3_sink(
            moto_s3, bucket, sse="AES256",
            object_lock_mode="GOVERNANCE", object_lock_retention_days=7,
        )  # fmt: skip
        asyncio.run(write_batches(sink, make_events(2, ts_ms=HOUR10)))
        client: Any = moto_s3.client()
        (key,) = objects(moto_s3, bucket)
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "AES256"
        assert head["ObjectLockMode"] == "GOVERNANCE"
        days = (head["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.UTC)).days
        assert 6 <= days <= 7


class TestErrors:
    def test_missing_bucket_fails_at_start_naming_the_key(self, moto_s3: MotoS3) -> None:
        sink = s3_sink(moto_s3, "no-such-bucket-here")
        with pytest.raises(RetriableSinkError, match=r"sinks\.s3\.bucket"):
            asyncio.run(sink.start())

    def test_bad_config_names_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"object_lock"):
            S3Sink.from_mapping({"bucket": "abc", "object_lock_mode": "COMPLIANCE"})
        with pytest.raises(ConfigError, match=r"sinks\.s3\.format"):
            S3Sink.from_mapping({"bucket": "abc", "format": "parquet"})


@pytest.fixture
def own_moto() -> Iterator[MotoS3]:
    """A moto server this test may stop and restart (buckets survive: state is in-process)."""
    server = MotoS3()
    server.start()
    try:
        yield server
    finally:
        if server.running:
            server.stop()


class TestOutage:
    def test_s3_down_for_a_while_loses_nothing(self, own_moto: MotoS3, settings: Settings) -> None:
        """S3 stops answering: the partition pauses and retries; once back, all arrive once."""
        bucket = own_moto.new_bucket()
        evs = make_events(300)
        s = fast(settings, max_events=50, backoff_initial_secs=0.05, backoff_max_secs=0.3)
        sink = s3_sink(own_moto, bucket, upload_timeout_secs=2.0, max_attempts=1)

        async def scenario() -> SinkRunner:
            runner = SinkRunner(sink, s)
            task = asyncio.create_task(runner.run())
            try:
                await wait_for(runner.assigned.is_set, 30, "partition assignment")
                await asyncio.to_thread(own_moto.stop)
                await produce_events(s, evs)
                await wait_for(lambda: runner.stats.retried >= 3, 60, "failed uploads")
                assert runner.stats.written == 0
                assert runner.snapshot()["paused"]
                await asyncio.to_thread(own_moto.start)
                await wait_for(lambda: runner.stats.written >= len(evs), 60, "all written")
            finally:
                runner.stop()
                await asyncio.wait_for(task, 30)
            assert await committed(s, runner.group_id) == len(evs)
            return runner

        asyncio.run(scenario())
        ids = jsonl_ids(objects(own_moto, bucket))
        assert len(ids) == len(evs) and set(ids) == {e["event_id"] for e in evs}
