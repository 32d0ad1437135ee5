"""The sink runner on the real broker: batches, commits after writes, retries, dead letters."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from auditpipe.schemas import Event, encode, new_event
from auditpipe.sinks import PermanentSinkError, RetriableSinkError, Sink
from auditpipe.sinks.runner import SinkRunner
from auditpipe.sinks.stdout import StdoutSink

from auditpipe.dlq import H_REASON, H_STAGE, headers_dict
from auditpipe.settings import Settings

from .kafkautil import consume, produce


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


async def committed(settings: Settings, group: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, group_id=group)
    await consumer.start()
    try:
        total = 0
        for p in range(settings.kafka.partitions):
            total += await consumer.committed(TopicPartition(settings.kafka.events_topic, p)) or 0
        return total
    finally:
        await consumer.stop()


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
