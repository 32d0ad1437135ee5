"""Erasure on the real stores: PostgreSQL, moto S3 over HTTP, files with rotated gzip segments,
and MongoDB at the wire level (mockupdb: no MongoDB server can be installed here)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auditpipe.privacy.erasure import Erasable, erase_everywhere
from auditpipe.privacy.selector import Selector

from .erasefixtures import (
    BASE_MS,
    FileHarness,
    FilteringMongo,
    MongoHarness,
    PgHarness,
    S3Harness,
    population,
)
from .sinkfixtures import MotoS3

SELECTORS = {
    "user": Selector("user", "alice"),
    "tenant": Selector("tenant", "globex"),
    "request_id": Selector("request_id", "req-7"),
    "metadata": Selector("metadata", pairs=(("ticket", "T-3"), ("team", "red"))),
    "user_in_window": Selector(
        "user", "bob", since_ms=BASE_MS + 3_600_000, until_ms=BASE_MS + 4 * 3_600_000
    ),
}


@pytest.fixture
def fake_mongo() -> Iterator[FilteringMongo]:
    server = FilteringMongo()
    try:
        yield server
    finally:
        server.stop()


# Every selector on file, s3 (jsonl), postgres and mongodb; two on the other S3 layouts (the
# selector code is the same there; this keeps the run short).
CASES = [
    (store, which)
    for store in ("file", "s3-jsonl", "postgres", "mongodb", "s3-avro", "s3-per-event")
    for which in SELECTORS
    if not store.startswith(("s3-avro", "s3-per")) or which in ("user", "metadata")
]


@pytest.fixture
def harness(
    request: Any, tmp_path: Path, moto_s3: MotoS3, pg_dsn: str, fake_mongo: FilteringMongo
) -> Any:
    kind = request.param
    if kind == "file":
        return FileHarness(tmp_path)
    if kind == "s3-jsonl":
        return S3Harness(moto_s3)
    if kind == "s3-avro":
        return S3Harness(moto_s3, format="avro")
    if kind == "s3-per-event":
        return S3Harness(moto_s3, mode="per_event")
    if kind == "postgres":
        return PgHarness(pg_dsn)
    return MongoHarness(fake_mongo)


async def erase_with(harness: Any, selector: Selector, dry_run: bool = False) -> Any:
    sink = harness.sink()
    try:
        (receipt,) = await erase_everywhere({harness.name: sink}, selector, dry_run=dry_run)
    finally:
        await sink.stop()
    return receipt


class TestEveryStore:
    @pytest.mark.parametrize(("harness", "which"), CASES, indirect=["harness"])
    def test_erases_exactly_the_selected_records_and_leaves_others_byte_identical(
        self, harness: Any, which: str
    ) -> None:
        """The selected records are gone, every other record is stored byte for byte as before,
        and a second erasure is a no-op."""
        selector = SELECTORS[which]
        events = population(36 if harness.name == "s3" else 60)
        expected = {e["event_id"] for e in events if selector.matches(e)}
        assert 0 < len(expected) < len(events)
        harness.load(events)
        before = harness.snapshot()
        assert set(before) == {e["event_id"] for e in events}
        assert isinstance(harness.sink(), Erasable)

        dry = asyncio.run(erase_with(harness, selector, dry_run=True))
        assert (dry.matched, dry.erased, dry.error) == (len(expected), 0, None)
        assert harness.snapshot() == before

        receipt = asyncio.run(erase_with(harness, selector))
        assert receipt.error is None, receipt.error
        assert (receipt.matched, receipt.erased, receipt.skipped) == (
            len(expected), len(expected), {},
        )  # fmt: skip
        after = harness.snapshot()
        assert after == {k: v for k, v in before.items() if k not in expected}

        again = asyncio.run(erase_with(harness, selector))
        assert (again.matched, again.erased, again.error) == (0, 0, None)
        assert harness.snapshot() == after


class TestFiles:
    def test_rotated_gzip_segments_are_rewritten_and_no_plaintext_remains(
        self, tmp_path: Path
    ) -> None:
        h = FileHarness(tmp_path)
        h.load(population())
        names = [f.name for f in h.files()]
        assert sum(n.endswith(".gz") for n in names) >= 3 and "audit.jsonl" in names
        assert b"alice-secret-" in h.raw_bytes()
        asyncio.run(erase_with(h, Selector("user", "alice")))
        assert b"alice-secret-" not in h.raw_bytes()
        assert b"bob-secret-" in h.raw_bytes()
        assert not list(h.dir.glob("*.erase-tmp"))

    def test_a_running_sink_keeps_appending_after_its_active_file_was_rewritten(
        self, tmp_path: Path
    ) -> None:
        """The writer notices the swapped active file and appends to the new one."""
        h = FileHarness(tmp_path, max_bytes=10_000_000)
        events = population(12)

        async def run() -> None:
            sink = h.sink()
            await sink.start()
            try:
                await sink.write(events[:6])
                eraser = h.sink()
                await eraser.erase(Selector("user", "alice"))
                await sink.write(events[6:])
            finally:
                await sink.stop()

        asyncio.run(run())
        alice = Selector("user", "alice")
        kept = [e["event_id"] for e in events[:6] if not alice.matches(e)]
        kept += [e["event_id"] for e in events[6:]]
        assert list(h.snapshot()) == kept


class TestS3:
    def test_only_objects_holding_matches_are_rewritten_under_their_own_keys(
        self, moto_s3: MotoS3
    ) -> None:
        h = S3Harness(moto_s3)
        events = population()
        h.load(events)
        before = h.objects()
        asyncio.run(erase_with(h, Selector("request_id", "req-7")))
        after = h.objects()
        changed = [k for k in before if before[k] != after.get(k)]
        assert len(changed) == 1 and changed[0] in after  # same key, new content
        assert all(after[k] == before[k] for k in before if k not in changed)

    def test_versioned_bucket_keeps_no_old_version_with_the_erased_records(
        self, moto_s3: MotoS3
    ) -> None:
        h = S3Harness(moto_s3)
        client: Any = moto_s3.client()
        client.put_bucket_versioning(Bucket=h.bucket, VersioningConfiguration={"Status": "Enabled"})
        h.load(population())
        asyncio.run(erase_with(h, Selector("user", "alice")))
        stored = h.all_versions_bytes()
        assert b"alice-secret-" not in stored and b"bob-secret-" in stored

    def test_objects_under_object_lock_are_skipped_and_reported(self, moto_s3: MotoS3) -> None:
        bucket = moto_s3.new_bucket(object_lock=True)
        h = S3Harness(moto_s3, bucket, object_lock_mode="GOVERNANCE", object_lock_retention_days=7)
        events = population(20)
        h.load(events)
        before = h.snapshot()
        receipt = asyncio.run(erase_with(h, Selector("user", "alice")))
        n = sum(Selector("user", "alice").matches(e) for e in events)
        assert (receipt.matched, receipt.erased) == (n, 0)
        ((reason, kept),) = receipt.skipped.items()
        assert "Object Lock GOVERNANCE" in reason and "encrypt_content" in reason and kept == n
        assert h.snapshot() == before
        assert not receipt.complete


class TestMinRetention:
    def test_records_younger_than_min_retention_days_are_kept_unless_overridden(
        self, tmp_path: Path
    ) -> None:
        import time

        now = time.time_ns() // 1_000_000
        old = population(12, base_ms=now - 400 * 86_400_000)
        young = population(12, base_ms=now - 86_400_000)
        h = FileHarness(tmp_path)
        h.load(old + young)
        sel = Selector("user", "alice")
        n_old = sum(sel.matches(e) for e in old)
        n_young = sum(sel.matches(e) for e in young)

        async def run(override: bool) -> Any:
            sink = h.sink()
            (r,) = await erase_everywhere(
                {"file": sink}, sel, min_retention_days=183, override_retention=override
            )
            return r

        r = asyncio.run(run(False))
        assert (r.matched, r.erased) == (n_old + n_young, n_old)
        assert r.skipped == {"younger than [privacy] min_retention_days (183 days)": n_young}
        r = asyncio.run(run(True))
        assert (r.matched, r.erased, r.skipped) == (n_young, n_young, {})


class TestFailures:
    def test_a_store_that_fails_gets_a_receipt_with_the_error_and_the_others_go_on(
        self, tmp_path: Path, moto_s3: MotoS3
    ) -> None:
        f = FileHarness(tmp_path)
        f.load(population(12))
        broken = S3Harness(moto_s3, bucket="no-such-bucket-here")

        async def run() -> Any:
            stores = {"file": f.sink(), "s3": broken.sink()}
            try:
                return await erase_everywhere(stores, Selector("user", "alice"))
            finally:
                for s in stores.values():
                    await s.stop()

        by = {r.sink: r for r in asyncio.run(run())}
        assert by["file"].error is None and by["file"].erased == 4
        assert by["s3"].error is not None and "NoSuchBucket" in by["s3"].error


class TestS3ConditionalRewrite:
    def test_an_object_rewritten_during_the_erasure_is_read_again_not_overwritten(
        self, moto_s3: MotoS3
    ) -> None:
        """If-Match on the ETag read: a batch redelivered between our GET and PUT makes the put
        fail (412 on moto as on S3); the object is read again and what was added survives."""
        import gzip

        import orjson
        from auditpipe.sinks.s3 import S3Sink

        h = S3Harness(moto_s3)
        events = population(5)
        h.load(events)
        ((key, body),) = h.objects().items()
        extra = population(1, base_ms=BASE_MS + 1)[0]
        extra["request_id"] = "late"
        sink = h.sink()
        original = S3Sink._encode
        raced = []

        def encode(self: S3Sink, k: str, original_body: bytes, kept: list[Any]) -> bytes:
            if not raced:  # another writer replaces the object after our GET
                raced.append(k)
                lines = gzip.decompress(body) + orjson.dumps(extra) + b"\n"
                client: Any = moto_s3.client()
                client.put_object(Bucket=h.bucket, Key=k, Body=gzip.compress(lines))
            return original(self, k, original_body, kept)

        sink._encode = encode.__get__(sink)  # type: ignore[method-assign]
        try:
            result = asyncio.run(sink.erase(Selector("request_id", "req-1")))
        finally:
            asyncio.run(sink.stop())
        assert raced == [key] and result.erased == 1
        ids = set(h.snapshot())
        assert extra["event_id"] in ids and events[1]["event_id"] not in ids
        assert ids == {e["event_id"] for e in events if e["request_id"] != "req-1"} | {
            extra["event_id"]
        }
