"""The sink runner on the real broker: batches, commits after writes, retries, dead letters."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from auditpipe.schemas import Event, encode, new_event
from auditpipe.sinks import Batch, PermanentSinkError, RetriableSinkError, Sink
from auditpipe.sinks.runner import SinkRunner
from auditpipe.sinks.stdout import StdoutSink

from auditpipe.dlq import H_REASON, H_STAGE, headers_dict
from auditpipe.settings import Settings

from .kafkautil import consume, produce
from .sinkutil import committed, fast, make_events, produce_events, wait_for
from .sinkutil import run_until as run_sink


class RecordingSink(Sink):
    """A test sink that stores batches in memory and fails as told."""

    name = "recording"

    def __init__(self, retriable_failures: int = 0, reject_model: str | None = None) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.retriable_failures = retriable_failures
        self.reject_model = reject_model
        self.calls = 0

    async def write(self, batch: Sequence[Event]) -> None:
        self.calls += 1
        if self.retriable_failures:
            self.retriable_failures -= 1
            raise RetriableSinkError("store unavailable")
        if self.reject_model and any(e["model"] == self.reject_model for e in batch):
            raise PermanentSinkError("model rejected")
        self.events.extend(batch)


async def run_until(runner: SinkRunner, done: Any, timeout_secs: float = 30.0) -> None:
    task = asyncio.create_task(runner.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout_secs
        while not done():
            if task.done():
                task.result()
            assert asyncio.get_running_loop().time() < deadline, "runner did not finish in time"
            await asyncio.sleep(0.02)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 15)


def events(n: int, **fields: Any) -> list[Event]:
    return [new_event(request_id=f"r{i}", model="m", **fields) for i in range(n)]


class TestSinkRunner:
    def test_stdout_sink_writes_one_json_line_per_event_and_commits(
        self, settings: Settings
    ) -> None:
        """Good records become JSON lines; garbage goes to the DLQ; offsets cover both."""
        evs = events(20)
        values = [encode(e) for e in evs[:10]] + [b"not avro"] + [encode(e) for e in evs[10:]]
        bootstrap = settings.kafka.bootstrap or ""

        async def scenario() -> SinkRunner:
            await produce(bootstrap, settings.kafka.events_topic, values)
            out = io.BytesIO()
            runner = SinkRunner(StdoutSink(stream=out), settings)
            await run_until(runner, lambda: runner.stats.received == 21)
            lines = out.getvalue().splitlines()
            assert sorted(orjson.loads(x)["request_id"] for x in lines) == sorted(
                e["request_id"] for e in evs
            )
            assert await committed(settings, runner.group_id) == 21
            dead = await consume(bootstrap, settings.kafka.dlq_topic, 1)
            assert dead[0].value == b"not avro"
            assert headers_dict(dead[0].headers)[H_STAGE] == "decode"
            return runner

        runner = asyncio.run(scenario())
        assert runner.stats.written == 20 and runner.stats.dead_lettered == 1

    def test_the_gc_threshold_is_raised_while_running_and_restored_after(
        self, settings: Settings
    ) -> None:
        """[runner] gc_gen0_threshold is a process-wide tweak: applied while the runner runs,
        put back when it stops; unset, the interpreter's setting is left alone."""
        import gc

        before = gc.get_threshold()
        seen: list[int] = []

        class Watching(RecordingSink):
            async def write(self, batch: Sequence[Event]) -> None:
                seen.append(gc.get_threshold()[0])
                await super().write(batch)

        async def scenario(threshold: int | None) -> None:
            await produce(settings.kafka.bootstrap or "", settings.kafka.events_topic,
                          [encode(e) for e in events(3)])  # fmt: skip
            runner_settings = settings.runner.model_copy(update={"gc_gen0_threshold": threshold})
            s = settings.model_copy(update={"runner": runner_settings})
            sink = Watching()
            await run_until(SinkRunner(sink, s), lambda: len(sink.events) >= 3)

        asyncio.run(scenario(123_456))
        assert seen and set(seen) == {123_456}
        assert gc.get_threshold() == before
        seen.clear()
        asyncio.run(scenario(None))
        assert seen and set(seen) == {before[0]}

    def test_retriable_errors_are_retried_without_loss_or_duplicates(
        self, settings: Settings
    ) -> None:
        sink = RecordingSink(retriable_failures=3)
        bootstrap = settings.kafka.bootstrap or ""

        async def scenario() -> SinkRunner:
            await produce(bootstrap, settings.kafka.events_topic, [encode(e) for e in events(5)])
            runner = SinkRunner(sink, settings)
            await run_until(runner, lambda: len(sink.events) == 5)
            return runner

        runner = asyncio.run(scenario())
        assert runner.stats.retried == 3
        assert sorted(e["request_id"] for e in sink.events) == [f"r{i}" for i in range(5)]

    def test_permanently_rejected_record_is_dead_lettered_and_the_rest_written(
        self, settings: Settings
    ) -> None:
        sink = RecordingSink(reject_model="poison")
        evs = events(4)
        evs[2]["model"] = "poison"
        bootstrap = settings.kafka.bootstrap or ""

        async def scenario() -> list[Any]:
            await produce(bootstrap, settings.kafka.events_topic, [encode(e) for e in evs])
            runner = SinkRunner(sink, settings)
            await run_until(
                runner, lambda: runner.stats.dead_lettered == 1 and len(sink.events) == 3
            )
            return await consume(bootstrap, settings.kafka.dlq_topic, 1)

        dead = asyncio.run(scenario())
        headers = headers_dict(dead[0].headers)
        assert headers[H_STAGE] == "sink:recording" and headers[H_REASON] == "rejected"
        assert {e["request_id"] for e in sink.events} == {"r0", "r1", "r3"}


class PartitionSink(Sink):
    """Records batches; fails (retriably) every write of partition ``broken`` while told to."""

    name = "partitioned"

    def __init__(self, broken: set[int] | None = None) -> None:
        super().__init__()
        self.batches: list[Batch] = []
        self.broken = broken or set()

    async def write(self, batch: Sequence[Event]) -> None:
        assert isinstance(batch, Batch)
        if batch.partition in self.broken:
            raise RetriableSinkError("partition's store is down")
        self.batches.append(batch)

    def count(self, partition: int | None = None) -> int:
        return sum(len(b) for b in self.batches if partition in (None, b.partition))


def keyed(n: int, partition: int, partitions: int = 2) -> list[tuple[bytes, bytes]]:
    """n encoded events whose keys land on ``partition`` (murmur2 of the key)."""
    from aiokafka.partitioner import DefaultPartitioner

    out, i = [], 0
    part = DefaultPartitioner()
    while len(out) < n:
        key = f"k{i}".encode()
        i += 1
        if part(key, list(range(partitions)), list(range(partitions))) == partition:
            out.append((key, encode(new_event(request_id=key.decode(), model="m"))))
    return out


async def produce_keyed(settings: Settings, items: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(settings.kafka.events_topic, value, key=key)
    finally:
        await producer.stop()


class TestBatchingAndBackpressure:
    def test_batches_are_cut_by_max_bytes_and_carry_their_source(self, settings: Settings) -> None:
        """With max_bytes small, batches stay under it (one event may exceed it alone)."""
        evs = make_events(40, size=2000)
        size = len(encode(evs[0]))
        s = fast(settings, max_events=1000, max_bytes=size * 5, max_wait_secs=0.5)
        sink = PartitionSink()

        async def scenario() -> None:
            await produce_events(s, evs)
            runner = SinkRunner(sink, s)
            await run_sink(runner, lambda: sink.count() == 40)

        asyncio.run(scenario())
        assert all(len(b) <= 5 for b in sink.batches), [len(b) for b in sink.batches]
        for b in sink.batches:
            assert b.topic == s.kafka.events_topic
            assert b.offsets == list(range(b.first_offset, b.first_offset + len(b)))

    def test_commits_follow_the_writes_in_order_while_the_next_write_runs(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Commits run in the background, yet each covers only written events, never goes back."""
        from aiokafka import AIOKafkaConsumer

        s = fast(settings, max_events=5, max_wait_secs=0.01)
        sink = PartitionSink()
        seen: list[tuple[int, int, int]] = []  # partition, committed offset, written up to
        commit = AIOKafkaConsumer.commit

        async def recording_commit(self: AIOKafkaConsumer, offsets: Any = None) -> None:
            for tp, offset in offsets.items():
                ends = [b.offsets[-1] + 1 for b in sink.batches if b.partition == tp.partition]
                seen.append((tp.partition, offset, max(ends, default=0)))
            await asyncio.sleep(0.005)  # a slow broker: the next write starts meanwhile
            await commit(self, offsets)

        monkeypatch.setattr(AIOKafkaConsumer, "commit", recording_commit)

        async def scenario() -> SinkRunner:
            await produce_keyed(s, keyed(30, 0) + keyed(30, 1))
            runner = SinkRunner(sink, s)
            await run_sink(runner, lambda: sink.count() == 60)
            assert await committed(s, runner.group_id) == 60
            return runner

        asyncio.run(scenario())
        for partition in (0, 1):
            offsets = [o for p, o, _ in seen if p == partition]
            assert offsets == sorted(set(offsets)), offsets
        assert len(seen) >= 4 and all(offset <= written for _, offset, written in seen), seen

    def test_a_failing_partition_is_paused_while_the_others_flow(self, settings: Settings) -> None:
        """Partition 0's store fails: it is paused and retried; partition 1 keeps being written."""
        s = fast(settings, max_events=10, backoff_initial_secs=0.05, backoff_max_secs=0.2)
        sink = PartitionSink(broken={0})

        async def scenario() -> SinkRunner:
            await produce_keyed(s, keyed(20, 0) + keyed(20, 1))
            runner = SinkRunner(sink, s)
            task = asyncio.create_task(runner.run())
            try:
                await wait_for(lambda: sink.count(1) == 20 and runner.stats.retried >= 3, 30,
                               "partition 1 written while 0 fails")  # fmt: skip
                assert sink.count(0) == 0
                assert runner.snapshot()["paused"] == [f"{s.kafka.events_topic}[0]"]
                assert await committed(s, runner.group_id) == 20
                sink.broken = set()
                await wait_for(lambda: sink.count(0) == 20, 30, "partition 0 after recovery")
                assert runner.snapshot()["paused"] == []
            finally:
                runner.stop()
                await asyncio.wait_for(task, 15)
            return runner

        runner = asyncio.run(scenario())
        assert runner.stats.written == 40

    def test_a_slow_sink_pauses_fetching_so_memory_stays_bounded(self, settings: Settings) -> None:
        """While a write hangs, at most four batches (plus one fetch) are buffered, then paused."""
        s = fast(settings, max_events=5, max_wait_secs=0.01)
        release = asyncio.Event()

        class SlowSink(PartitionSink):
            async def write(self, batch: Sequence[Event]) -> None:
                await release.wait()
                await super().write(batch)

        sink = SlowSink()

        async def scenario() -> None:
            await produce_keyed(s, keyed(60, 0))
            runner = SinkRunner(sink, s)
            task = asyncio.create_task(runner.run())
            try:
                await wait_for(lambda: runner.snapshot()["backpressured"], 30, "backpressure")
                assert runner.snapshot()["buffered"] <= 5 * 5
                assert runner.stats.received < 60
                release.set()
                await wait_for(lambda: sink.count() == 60, 30, "all written once released")
                assert runner.snapshot()["backpressured"] == []
            finally:
                release.set()
                runner.stop()
                await asyncio.wait_for(task, 15)

        asyncio.run(scenario())

    def test_stop_writes_the_buffered_batch_and_commits(self, settings: Settings) -> None:
        """SIGTERM path: records still waiting for max_wait_secs are written and committed."""
        s = fast(settings, max_events=1000, max_wait_secs=60.0)
        sink = PartitionSink()

        async def scenario() -> int:
            await produce_events(s, make_events(15))
            runner = SinkRunner(sink, s)
            await run_sink(runner, lambda: runner.stats.received == 15)
            assert sink.count() == 15, "stop() flushed what was buffered"
            return await committed(s, runner.group_id)

        assert asyncio.run(scenario()) == 15


class TestHealthAndMetrics:
    def test_healthz_and_prometheus_metrics(self, settings: Settings) -> None:
        """/healthz is 200 while consuming, 503 once a partition fails too long; /metrics counts."""
        import httpx

        s = fast(settings, health_port=0, unhealthy_after_secs=0.3, backoff_initial_secs=0.05)
        sink = PartitionSink()

        async def scenario() -> tuple[Any, ...]:
            await produce_events(s, make_events(12))
            runner = SinkRunner(sink, s)
            task = asyncio.create_task(runner.run())
            try:
                await wait_for(lambda: runner.stats.written == 12, 30, "12 written")
                host, port = runner.health_address or ("", 0)
                async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
                    ok = await client.get("/healthz")
                    metrics = (await client.get("/metrics")).text
                    sink.broken = {0, 1}
                    await produce_events(s, make_events(4))
                    await wait_for(lambda: runner.stats.retried > 0, 30, "a failing write")
                    unhealthy = None
                    deadline = asyncio.get_running_loop().time() + 30
                    while unhealthy is None or unhealthy.status_code != 503:
                        assert asyncio.get_running_loop().time() < deadline, "never unhealthy"
                        await asyncio.sleep(0.1)
                        unhealthy = await client.get("/healthz")
            finally:
                sink.broken = set()
                runner.stop()
                await asyncio.wait_for(task, 15)
            return ok, metrics, unhealthy

        ok, metrics, unhealthy = asyncio.run(scenario())
        assert ok.status_code == 200 and ok.json()["written"] == 12
        assert 'auditpipe_events_received_total{stage="sink.partitioned"} 12.0' in metrics
        assert 'auditpipe_events_sent_total{stage="sink.partitioned"} 12.0' in metrics
        assert (
            'auditpipe_events_dropped_total{reason="step",stage="sink.partitioned"} 0.0' in metrics
        )
        assert 'auditpipe_latency_seconds_count{op="write",stage="sink.partitioned"}' in metrics
        assert "auditpipe_lag{" in metrics
        assert "failing for" in unhealthy.json()["status"]


class TestRebalanceRace:
    """A poll drained records of a partition just before the coordinator began a rebalance,
    and the revoke listener ran before the loop took them in (aiokafka allows this order).

    A fake consumer stands in for aiokafka here: the race depends on where the coordinator's
    task is scheduled relative to the loop, which a real broker cannot be made to hit on
    demand. The runner under test is the real one."""

    def test_records_fetched_before_a_rebalance_are_not_written_past_unwritten_ones(
        self, settings: Settings
    ) -> None:
        from aiokafka.structs import ConsumerRecord, TopicPartition
        from auditpipe.sinks.runner import _Rebalance

        tp = TopicPartition("events", 0)
        n = 10

        def records(first: int) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
            return {tp: [
                ConsumerRecord("events", 0, o, 0, 0, None,
                               encode(new_event(request_id=f"r{o}")), None, 10, 100, [])
                for o in range(first, first + n)
            ]}  # fmt: skip

        class SlowSink(Sink):
            name = "slow"

            def __init__(self) -> None:
                super().__init__()
                self.release = asyncio.Event()
                self.written: list[int] = []

            async def write(self, batch: Batch) -> None:
                await self.release.wait()  # the store is slow: 10..19 queue up behind 0..9
                self.written += batch.offsets

        class RacingConsumer:
            def __init__(self, runner: SinkRunner) -> None:
                self.runner = runner
                self.polls = 0
                self.commits: list[int] = []
                self.revoking: asyncio.Future[None] | None = None

            def assignment(self) -> set[TopicPartition]:
                return {tp}

            async def commit(self, offsets: dict[TopicPartition, int]) -> None:
                self.commits.append(offsets[tp])

            def pause(self, *_: Any) -> None: ...
            def resume(self, *_: Any) -> None: ...

            async def getmany(self, *_: Any, timeout_ms: int, max_records: int) -> Any:
                self.polls += 1
                if self.polls <= 2:
                    return records(0 if self.polls == 1 else n)
                if self.polls == 3:  # drained; the rebalance begins in the same loop turn
                    self.revoking = asyncio.ensure_future(
                        _Rebalance(self.runner).on_partitions_revoked({tp})
                    )
                    return records(2 * n)
                await asyncio.sleep(timeout_ms / 1000)
                return {}

        async def scenario() -> tuple[SlowSink, RacingConsumer]:
            s = settings.model_copy(update={"runner": settings.runner.model_copy(
                update={"max_events": n, "max_wait_secs": 5})})  # fmt: skip
            sink = SlowSink()
            runner = SinkRunner(sink, s)
            consumer = RacingConsumer(runner)
            loop = asyncio.create_task(runner._loop(consumer))  # type: ignore[arg-type]
            await wait_for(lambda: consumer.polls >= 4, 10, "the poll after the rebalance")
            sink.release.set()
            await wait_for(lambda: bool(consumer.commits), 10, "a commit")
            runner.stop()
            await asyncio.wait_for(loop, 10)
            return sink, consumer

        sink, consumer = asyncio.run(scenario())
        assert consumer.commits == sorted(consumer.commits), "a commit went backwards"
        for offset in consumer.commits:
            missing = set(range(offset)) - set(sink.written)
            assert not missing, f"committed {offset} with {sorted(missing)} never written"
