"""The sink runner: one Kafka consumer group per sink, batches, commits after durable writes.

For each poll the runner decodes the records, hands the decodable events to ``sink.write`` in
one batch, dead-letters the rest (original bytes plus the reason in headers), and only then
commits each partition's offset. A retriable failure retries the same batch with exponential
backoff and jitter until it succeeds or the runner is stopped (offsets are then not committed,
so nothing is lost: the events are redelivered). A permanent failure is narrowed down to the
events the sink rejects, which are dead-lettered; the others are written.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition
from auditpipe.schemas import DecodeError, Event, decode

from auditpipe.dlq import dead_letter_headers
from auditpipe.kafka import producer_kwargs, require_bootstrap
from auditpipe.settings import Settings

from .base import PermanentSinkError, Sink

log = logging.getLogger("auditpipe.sinks")


@dataclass
class RunnerStats:
    received: int = 0
    written: int = 0
    retried: int = 0
    dead_lettered: int = 0
    commits: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class SinkRunner:
    """Consume ``kafka.events_topic`` into ``sink`` until :meth:`stop` is called."""

    def __init__(
        self,
        sink: Sink,
        settings: Settings,
        *,
        on_written: Callable[[Sequence[Event]], None] | None = None,
    ) -> None:
        self.sink = sink
        self.settings = settings
        self.on_written = on_written
        self.stats = RunnerStats()
        self.group_id = f"{settings.runner.group_prefix}{sink.name}"
        self.assigned = asyncio.Event()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None

    def stop(self) -> None:
        """Ask the runner to finish the current batch, commit and return from :meth:`run`."""
        self._stopping.set()

    async def run(self) -> None:
        kafka, runner = self.settings.kafka, self.settings.runner
        session_ms = int(runner.session_timeout_secs * 1000)
        consumer = AIOKafkaConsumer(
            kafka.events_topic,
            bootstrap_servers=require_bootstrap(kafka),
            client_id=f"{kafka.client_id}-sink-{self.sink.name}",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, min(1000, session_ms // 3)),
            max_poll_records=runner.max_events,
        )
        self._consumer = consumer
        self._dlq = AIOKafkaProducer(**producer_kwargs(kafka, self.settings.producer))
        await self.sink.start()
        try:
            await self._dlq.start()
            await consumer.start()
            await self._loop(consumer)
        finally:
            await self._shutdown(consumer)

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        runner = self.settings.runner
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                poll = asyncio.ensure_future(
                    consumer.getmany(
                        timeout_ms=int(runner.max_wait_secs * 1000) or 1,
                        max_records=runner.max_events,
                    )
                )
                await asyncio.wait({poll, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    poll.cancel()
                    break
                records = poll.result()
                if consumer.assignment():
                    self.assigned.set()
                if records:
                    await self._handle(consumer, records)
        finally:
            stopping.cancel()

    async def _handle(
        self, consumer: AIOKafkaConsumer, records: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        batch: list[Event] = []
        sources: list[ConsumerRecord] = []
        dead: list[tuple[ConsumerRecord, str, str, BaseException]] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, msgs in records.items():
            for msg in msgs:
                self.stats.received += 1
                try:
                    batch.append(decode(msg.value, self.settings.runner.reader_schema_id))
                    sources.append(msg)
                except DecodeError as exc:
                    dead.append((msg, "decode", exc.reason, exc))
                offsets[tp] = msg.offset + 1
        if batch:
            dead.extend(await self._write(batch, sources))
        if dead:
            await self._dead_letter(dead)
        await consumer.commit(offsets)
        self.stats.commits += 1

    async def _write(
        self, batch: list[Event], sources: list[ConsumerRecord]
    ) -> list[tuple[ConsumerRecord, str, str, BaseException]]:
        """Write ``batch``; return the records the sink permanently rejected."""
        try:
            await self._write_retrying(batch)
        except PermanentSinkError as exc:
            if len(batch) == 1:
                return [(sources[0], f"sink:{self.sink.name}", "rejected", exc)]
            rejected = []
            for event, src in zip(batch, sources, strict=True):
                rejected.extend(await self._write([event], [src]))
            return rejected
        return []

    async def _write_retrying(self, batch: list[Event]) -> None:
        backoff = 0.1
        while True:
            try:
                await self.sink.write(batch)
            except PermanentSinkError:
                raise
            except Exception as exc:
                name = type(exc).__name__
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                self.stats.retried += 1
                if self._stopping.is_set():
                    raise  # offsets stay uncommitted: redelivered after restart
                log.warning("sink %s: %s; retrying in %.2fs", self.sink.name, exc, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 30.0)
                continue
            self.stats.written += len(batch)
            if self.on_written is not None:
                self.on_written(batch)
            return

    async def _dead_letter(
        self, dead: list[tuple[ConsumerRecord, str, str, BaseException]]
    ) -> None:
        assert self._dlq is not None
        topic = self.settings.kafka.dlq_topic
        futures = []
        for msg, stage, reason, exc in dead:
            headers = dead_letter_headers(stage, reason, exc, msg.topic, msg.partition, msg.offset)
            futures.append(await self._dlq.send(topic, msg.value, key=msg.key, headers=headers))
        await asyncio.gather(*futures)  # raise (no commit) if the DLQ did not take them
        self.stats.dead_lettered += len(dead)

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        for step in (consumer.stop, self.sink.stop, self._dlq.stop if self._dlq else None):
            if step is None:
                continue
            try:
                await step()
            except Exception as exc:  # keep shutting down the rest
                log.warning("sink %s shutdown: %s", self.sink.name, exc)

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "sink": self.sink.name,
            "group": self.group_id,
            "received": s.received,
            "written": s.written,
            "retried": s.retried,
            "dead_lettered": s.dead_lettered,
            "errors": dict(s.errors),
        }
