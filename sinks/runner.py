"""The sink runner: one Kafka consumer group per sink, batches, commits after durable writes.

Records are buffered per partition. A partition's buffer is written (one ``sink.write`` call
with a :class:`~auditpipe.sinks.base.Batch`) once it holds ``runner.max_events`` records or
``runner.max_bytes`` bytes, or its oldest record has waited ``runner.max_wait_secs``. Records
that do not decode are dead-lettered (original bytes, reason in headers). Only after the write
and the dead letters succeeded is the partition's offset committed, so every committed offset
covers events that are durably stored or in the DLQ.

Each partition has at most one write in flight (a task), so its batches are written and
committed in offset order, while the loop keeps fetching and other partitions' writes run
concurrently. A partition with four batches' worth buffered behind a slow write is no longer
drained from the consumer until it goes below that (aiokafka then fetches nothing more for
it): memory stays bounded.

Errors, and who handles them:

- :class:`RetriableSinkError` (and any unexpected exception): the partition is paused
  (``consumer.pause``: nothing more is fetched for it) and the same batch, same first
  offset, is retried after an exponential, jittered delay (``backoff_initial_secs``
  doubling up to ``backoff_max_secs``). Other partitions keep flowing. On success the
  partition is resumed.
- :class:`PermanentSinkError`: the batch is bisected until the rejected events are isolated;
  those are dead-lettered (stage ``sink:NAME``, reason ``rejected``) and the rest written.
- A DLQ that does not take the records counts as retriable: nothing is committed.
- With ``[sinks.NAME] encrypt_content = true`` each batch's ``input``/``output`` are sealed
  under their subject's data key just before the write (:mod:`auditpipe.privacy.envelope`);
  a key store that fails makes the write retriable.
- The sink's own steps (``[sinks.NAME] steps``, see ``base.py``) run on each event as it is
  decoded. An event a step fails on is dead-lettered (stage ``sink:NAME:step:STEP``, reason
  ``step_failed``) and never written: a failing redact step fails closed. An event a step
  drops (a sample step) is counted as ``dropped`` and committed.

:meth:`SinkRunner.stop` (SIGTERM/SIGINT in ``auditpipe sink``) stops fetching, gives every
buffered batch one last write attempt, commits what was written and returns. Whatever was
not written stays uncommitted and is redelivered to the next runner of the group.

Records are decoded as they arrive, so a partition's next batches are decoded while its
current write is in flight; the commit after a write runs in the background while the next
write starts (a partition's commits are chained, so its committed offset only moves forward).
While it runs, the runner raises the cyclic GC's first-generation threshold of the process to
``[runner] gc_gen0_threshold`` (see there why; unset leaves it alone) and restores it after.

Health and metrics: with ``runner.health_port`` set, ``/healthz`` and ``/metrics``
(Prometheus) are served; see :mod:`auditpipe.sinks.health`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, TopicPartition
from auditpipe.schemas import DecodeError, Event, decode

from auditpipe.dlq import dead_letter_headers
from auditpipe.kafka import client_kwargs, producer_kwargs, start_client
from auditpipe.metrics import Latency
from auditpipe.retry import Backoff, is_permanent
from auditpipe.settings import Settings

from .base import Batch, Sink

log = logging.getLogger("auditpipe.sinks")

Dead = tuple[ConsumerRecord, str, str, BaseException]


@dataclass(frozen=True)
class _Rejected:
    """A record that will not be written: (stage, reason, error) for the dead letter."""

    stage: str
    reason: str
    error: BaseException


#: A record one of the sink's steps dropped (written nowhere, committed).
_DROPPED = object()
Outcome = Event | _Rejected | object


@dataclass
class RunnerStats:
    received: int = 0
    written: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dropped: int = 0  # by the sink's own steps
    commits: int = 0
    batches: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dead_reasons: dict[str, int] = field(default_factory=dict)  # dead_lettered by reason
    write_latency: Latency = field(default_factory=Latency)  # one sink write of one batch


@dataclass
class _Partition:
    """What the runner holds for one assigned partition."""

    records: list[ConsumerRecord] = field(default_factory=list)
    decoded: list[Outcome] = field(default_factory=list)  # records[i], decoded and stepped
    nbytes: int = 0
    since: float = 0.0  # monotonic time the oldest buffered record arrived
    failing_since: float | None = None
    retry_at: float = 0.0
    backoff: Backoff | None = None  # while failing: the delays of its retries
    committed: int | None = None
    task: asyncio.Task[bool] | None = None  # the write in flight (one per partition)
    commit: asyncio.Task[None] | None = None  # the latest commit (they run in offset order)
    full: bool = False  # four batches' worth is buffered: not drained from the consumer
    paused: bool = False


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runner: SinkRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # A write in flight finishes and commits first; buffered records of a revoked
        # partition are uncommitted: its next owner reads them. Forgotten first, so that the
        # loop starts no further write for it meanwhile; records fetched before this point
        # and not yet taken in are dropped by the loop (see ``_generation``).
        self.runner._generation += 1
        for tp in revoked:
            part = self.runner._parts.pop(tp, None)
            if part is not None and part.task is not None:
                await asyncio.wait({part.task})
            if part is not None and part.commit is not None:
                await asyncio.wait({part.commit})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.runner._generation += 1
        if assigned:
            self.runner.assigned.set()


def _size(msg: ConsumerRecord) -> int:
    return len(msg.value or b"") + len(msg.key or b"")


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
        self._steps = tuple(getattr(sink, "steps", ()))
        #: Seals input/output before each write when the sink has ``encrypt_content`` (opened
        #: at :meth:`run` from ``[privacy]``; see auditpipe.privacy.envelope).
        self.cipher: Any = None
        self.on_written = on_written
        self.stats = RunnerStats()
        self.group_id = f"{settings.runner.group_prefix}{sink.name}"
        self.assigned = asyncio.Event()
        self.health_address: tuple[str, int] | None = None
        self._stopping = asyncio.Event()
        self._running = False
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._parts: dict[TopicPartition, _Partition] = {}
        # Moves at every rebalance. Records that a poll returned before it moved are dropped,
        # not buffered: after an (eager) rebalance the consumer reads every partition again
        # from its committed offset, and a stale batch taken in behind a revoked partition's
        # unwritten records could be committed past them.
        self._generation = 0

    def stop(self) -> None:
        """Ask the runner to finish the current batches, commit and return from :meth:`run`."""
        self._stopping.set()

    async def run(self) -> None:
        kafka, runner = self.settings.kafka, self.settings.runner
        session_ms = int(runner.session_timeout_secs * 1000)
        heartbeat_ms = (
            int(runner.heartbeat_interval_secs * 1000)
            if runner.heartbeat_interval_secs
            else max(100, min(1000, session_ms // 3))
        )
        consumer = AIOKafkaConsumer(
            **client_kwargs(kafka),
            client_id=f"{kafka.client_id}-sink-{self.sink.name}",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=heartbeat_ms,
            max_poll_records=runner.max_events,
        )
        consumer.subscribe([kafka.events_topic], listener=_Rebalance(self))
        saved_gc = gc.get_threshold()
        wanted = runner.gc_gen0_threshold
        if wanted is not None and 0 < saved_gc[0] < wanted:  # 0: the GC is off; leave it so
            gc.set_threshold(wanted, *saved_gc[1:])
        self._consumer = consumer
        self._dlq = AIOKafkaProducer(**producer_kwargs(kafka, self.settings.producer))
        health = None
        if getattr(self.sink.config, "encrypt_content", False) and self.cipher is None:
            from auditpipe.privacy.envelope import content_cipher

            self.cipher = await asyncio.to_thread(content_cipher, self.settings)
        try:
            await self.sink.start()
        except BaseException:
            await self._close_cipher()
            raise
        try:
            # runner.health_port (older key) or [metrics] port: /healthz and /metrics
            metrics = self.settings.metrics
            host, port = runner.health_host, runner.health_port
            if port is None and metrics.port is not None:
                host, port = metrics.host, metrics.port
            if port is not None:
                from .health import serve_health

                health = await serve_health(self, host, port)
                sock = health.sockets[0].getsockname()
                self.health_address = (sock[0], sock[1])
                log.info("sink %s: /healthz and /metrics on http://%s:%d", self.sink.name,
                         sock[0], sock[1])  # fmt: skip
            await start_client(self._dlq, kafka)
            await start_client(consumer, kafka)
            self._running = True
            await self._loop(consumer)
        finally:
            self._running = False
            if health is not None:
                health.close()
            await self._shutdown(consumer)
            await self._close_cipher()
            gc.set_threshold(*saved_gc)

    async def _close_cipher(self) -> None:
        cipher, self.cipher = self.cipher, None
        if cipher is not None:
            await asyncio.to_thread(cipher.close)

    # -----------------------------------------------------------------------------------------
    # The loop

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        runner = self.settings.runner
        stopping = asyncio.ensure_future(self._stopping.wait())
        poll: asyncio.Future[Any] | None = None
        polling: frozenset[TopicPartition] | None = None  # what ``poll`` drains (None: all)
        try:
            while not self._stopping.is_set():
                wanted = self._drainable(consumer)
                if poll is not None and polling != wanted and poll.cancel():
                    poll = None  # cancelled before it drained anything: nothing is lost
                if poll is None and wanted != frozenset():
                    poll = asyncio.ensure_future(self._poll(consumer, wanted))
                    polling = wanted
                # Wake for records, for a finished write (to start the partition's next one),
                # for a retry that is due, or to stop.
                writes = [p.task for p in self._parts.values() if p.task is not None]
                await asyncio.wait(
                    {*([poll] if poll is not None else ()), stopping, *writes},
                    timeout=self._poll_timeout(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if self._stopping.is_set():
                    break
                if poll is None or not poll.done():
                    self._schedule(consumer)
                    continue
                (records, generation), poll = poll.result(), None
                if consumer.assignment():
                    self.assigned.set()
                now = time.monotonic()
                assignment = consumer.assignment()
                for tp, msgs in records.items():
                    if generation != self._generation or tp not in assignment:
                        log.info("sink %s: %d record(s) of %s fetched before a rebalance "
                                 "dropped (read again from the committed offset)",
                                 self.sink.name, len(msgs), tp)  # fmt: skip
                        continue
                    part = self._parts.setdefault(tp, _Partition())
                    if not part.records:
                        part.since = now
                    part.records.extend(msgs)
                    # Decoded on arrival: while a partition's write is in flight, the loop
                    # decodes its next batches, so the write of batch k overlaps the decoding
                    # (and fetching) of batch k+1.
                    part.decoded.extend(self._decode(m) for m in msgs)
                    part.nbytes += sum(_size(m) for m in msgs)
                    self.stats.received += len(msgs)
                    if (
                        len(part.records) >= 4 * runner.max_events
                        or part.nbytes >= 4 * runner.max_bytes
                    ):
                        part.full = True
                self._schedule(consumer)
            if poll is not None and not poll.done():
                poll.cancel()
            in_flight = [p.task for p in self._parts.values() if p.task is not None]
            if in_flight:
                await asyncio.wait(in_flight)
            self._collect()
            await self._flush(consumer, final=True)
            commits = [p.commit for p in self._parts.values() if p.commit is not None]
            if commits:
                await asyncio.wait(commits)
        finally:
            stopping.cancel()
            if poll is not None and not poll.done():
                poll.cancel()

    def _collect(self) -> None:
        for part in self._parts.values():
            if part.task is not None and part.task.done():
                if not part.task.cancelled() and part.task.exception() is not None:
                    self._count_error(part.task.exception())  # type: ignore[arg-type]
                    log.error("sink %s: delivery failed: %r", self.sink.name, part.task.exception())
                part.task = None

    def _schedule(self, consumer: AIOKafkaConsumer) -> None:
        """Start a write for every ready partition that has none in flight.

        Writes of different partitions overlap each other and the next fetch; a partition's
        batches are written and committed strictly in order.
        """
        self._collect()
        now = time.monotonic()
        for tp, part in self._parts.items():
            if part.task is None and self._ready(part, now):
                part.task = asyncio.create_task(self._deliver(consumer, tp, part))

    async def _poll(
        self, consumer: AIOKafkaConsumer, wanted: frozenset[TopicPartition] | None
    ) -> tuple[dict[TopicPartition, list[ConsumerRecord]], int]:
        """Records, and the rebalance generation they were fetched in (read with no await
        in between, so a rebalance cannot slip between the two)."""
        records = await consumer.getmany(
            *(wanted or ()),
            timeout_ms=int(self._poll_timeout() * 1000) or 1,
            max_records=self.settings.runner.max_events,
        )
        return records, self._generation

    def _drainable(self, consumer: AIOKafkaConsumer) -> frozenset[TopicPartition] | None:
        """The partitions to take records from: all (None) unless some are full.

        A full partition is left alone rather than paused: aiokafka fetches nothing more for a
        partition while it holds records of it that were not taken, so at most one fetch
        response (``max_partition_fetch_bytes``) waits beside the four buffered batches,
        and it is not thrown away (pausing would discard it and fetch it again on resume).
        """
        full = {tp for tp, part in self._parts.items() if part.full}
        if not full:
            return None
        return frozenset(tp for tp in consumer.assignment() if tp not in full)

    def _set_paused(self, consumer: AIOKafkaConsumer, tp: TopicPartition, part: _Partition) -> None:
        want = part.failing_since is not None
        if want != part.paused and tp in consumer.assignment():
            (consumer.pause if want else consumer.resume)(tp)
            part.paused = want

    def _poll_timeout(self) -> float:
        runner = self.settings.runner
        now = time.monotonic()
        timeout = max(runner.max_wait_secs, 0.05)
        for part in self._parts.values():
            if not part.records or part.task is not None:
                continue  # a write in flight wakes the loop when it finishes
            due = part.retry_at if part.failing_since is not None else part.since
            due += 0 if part.failing_since is not None else runner.max_wait_secs
            timeout = min(timeout, due - now)
        return min(max(timeout, 0.001), 1.0)

    def _ready(self, part: _Partition, now: float) -> bool:
        runner = self.settings.runner
        if not part.records:
            return False
        if part.failing_since is not None:
            return now >= part.retry_at
        return (
            len(part.records) >= runner.max_events
            or part.nbytes >= runner.max_bytes
            or now - part.since >= runner.max_wait_secs
        )

    async def _flush(self, consumer: AIOKafkaConsumer, final: bool) -> None:
        for tp in list(self._parts):
            part = self._parts.get(tp)
            while part is not None and (
                (final and part.records) or self._ready(part, time.monotonic())
            ):
                if not await self._deliver(consumer, tp, part) or (final and not part.records):
                    break
                part = self._parts.get(tp)

    def _decode(self, msg: ConsumerRecord) -> Outcome:
        """The record's event after the sink's steps, or why it is not written."""
        try:
            event = decode(msg.value, self.settings.runner.reader_schema_id)
        except DecodeError as exc:
            return _Rejected("decode", exc.reason, exc)
        for step in self._steps:
            try:
                result = step(event)
            except Exception as exc:  # fail closed: dead-lettered, never written as it was
                name = getattr(step, "__name__", type(step).__name__)
                return _Rejected(f"sink:{self.sink.name}:step:{name}", "step_failed", exc)
            if result is None:
                return _DROPPED
            event = result
        return event

    def _take(self, part: _Partition) -> tuple[int, int]:
        """How many of the partition's buffered records the next batch takes, and their bytes."""
        runner = self.settings.runner
        if part.nbytes < runner.max_bytes and len(part.records) <= runner.max_events:
            return len(part.records), part.nbytes
        count = nbytes = 0
        for msg in part.records:
            if count and (count >= runner.max_events or nbytes >= runner.max_bytes):
                break
            count += 1
            nbytes += _size(msg)
        return count, nbytes

    async def _deliver(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, part: _Partition
    ) -> bool:
        """Write the partition's next batch and dead-letter, then start its commit (which runs
        after the previous commits of the partition). False if the batch must be retried."""
        count, nbytes = self._take(part)
        chunk = part.records[:count]
        decoded = part.decoded[:count]
        events: list[Event] = []
        offsets: list[int] = []
        dead: list[Dead] = []
        dropped = 0
        for msg, outcome in zip(chunk, decoded, strict=True):
            if isinstance(outcome, _Rejected):
                dead.append((msg, outcome.stage, outcome.reason, outcome.error))
            elif outcome is _DROPPED:
                dropped += 1
            else:
                events.append(outcome)  # type: ignore[arg-type]
                offsets.append(msg.offset)
        batch = Batch(events, tp.topic, tp.partition, offsets)
        try:
            if self.cipher is not None and batch:  # key store trouble: retried like a write
                sealed = await asyncio.to_thread(self.cipher.encrypt_all, batch)
                batch = Batch(sealed, tp.topic, tp.partition, offsets)
            started = time.monotonic()
            rejected = await self._write_isolating(batch) if batch else []
            if batch:
                self.stats.write_latency.observe(time.monotonic() - started)
            if rejected:
                sources = {m.offset: m for m in chunk}
                dead.extend(
                    (sources[o], f"sink:{self.sink.name}", "rejected", e) for o, e in rejected
                )
            if dead:
                await self._dead_letter(dead)
        except Exception as exc:
            self._failed(consumer, tp, part, exc)
            return False
        del part.records[:count]
        del part.decoded[:count]
        part.nbytes -= nbytes
        part.since = time.monotonic()
        runner = self.settings.runner
        if part.full and (
            len(part.records) < 4 * runner.max_events and part.nbytes < 4 * runner.max_bytes
        ):
            part.full = False
        if part.failing_since is not None:
            part.failing_since = None
            part.backoff = None
            log.warning("sink %s: %s recovered", self.sink.name, tp)
        self._set_paused(consumer, tp, part)
        self.stats.batches += 1
        self.stats.dead_lettered += len(dead)
        for _, _, reason, _ in dead:
            self.stats.dead_reasons[reason] = self.stats.dead_reasons.get(reason, 0) + 1
        self.stats.dropped += dropped
        written = len(batch) - len(rejected)
        self.stats.written += written
        if self.on_written is not None and written:
            done = {o for o, _ in rejected}
            self.on_written([e for e, o in zip(batch, batch.offsets, strict=True) if o not in done])
        # Everything up to next_offset is durably written (or dead-lettered): commit it, in
        # the background so the partition's next write can start meanwhile. Each commit waits
        # for the partition's previous one, so committed offsets only move forward.
        part.commit = asyncio.create_task(
            self._commit(consumer, tp, part, chunk[-1].offset + 1, part.commit)
        )
        return True

    async def _commit(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        part: _Partition,
        next_offset: int,
        previous: asyncio.Task[None] | None,
    ) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        try:
            await consumer.commit({tp: next_offset})
            part.committed = next_offset
            self.stats.commits += 1
        except Exception as exc:  # rebalanced away: the new owner redelivers (writes idempotent)
            self._count_error(exc)
            log.warning("sink %s: commit of %s failed: %s", self.sink.name, tp, exc)

    def _failed(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, part: _Partition, exc: BaseException
    ) -> None:
        runner = self.settings.runner
        now = time.monotonic()
        self._count_error(exc)
        self.stats.retried += 1
        if part.failing_since is None or part.backoff is None:
            first = runner.backoff_initial_secs
            part.backoff = Backoff(first, max(runner.backoff_max_secs, first))
        delay = part.backoff.next()
        if part.failing_since is None:
            part.failing_since = now
            self._set_paused(consumer, tp, part)
        part.retry_at = now + delay
        log.warning(
            "sink %s: %s write failed (%s: %s); partition paused, retry in %.2fs",
            self.sink.name, tp, type(exc).__name__, exc, delay,
        )  # fmt: skip

    def _count_error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.stats.errors[name] = self.stats.errors.get(name, 0) + 1

    async def _write_isolating(self, batch: Batch) -> list[tuple[int, BaseException]]:
        """Write ``batch``; return (offset, error) of the events the sink permanently rejects.

        Bisects on a permanent error (:func:`auditpipe.retry.is_permanent`:
        :class:`PermanentSinkError` and any error that says so). Any other error propagates
        (retry the batch; halves already written are rewritten harmlessly, writes being idempotent).
        """
        try:
            await self.sink.write(batch)
        except Exception as exc:
            if not is_permanent(exc):  # PermanentSinkError, or an error that says it is one
                raise
            if len(batch) == 1:
                return [(batch.offsets[0], exc)]
            mid = len(batch) // 2
            left = await self._write_isolating(batch.slice(0, mid))
            return left + await self._write_isolating(batch.slice(mid, len(batch)))
        return []

    async def _dead_letter(self, dead: list[Dead]) -> None:
        assert self._dlq is not None
        topic = self.settings.kafka.dlq_topic
        futures = []
        for msg, stage, reason, exc in dead:
            headers = dead_letter_headers(stage, reason, exc, msg.topic, msg.partition, msg.offset)
            futures.append(await self._dlq.send(topic, msg.value, key=msg.key, headers=headers))
        await asyncio.gather(*futures)  # raise (no commit) if the DLQ did not take them

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        for step in (consumer.stop, self.sink.stop, self._dlq.stop if self._dlq else None):
            if step is None:
                continue
            try:
                await step()
            except Exception as exc:  # keep shutting down the rest
                log.warning("sink %s shutdown: %s", self.sink.name, exc)

    # -----------------------------------------------------------------------------------------
    # Observability

    def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: high watermark minus the committed offset (as last seen)."""
        consumer = self._consumer
        if consumer is None or not self._running:
            return {}
        out = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            part = self._parts.get(tp)
            base = part.committed if part and part.committed is not None else None
            if base is None and part and part.records:
                base = part.records[0].offset
            out[tp] = max(0, high - base) if base is not None else 0
        return out

    def healthy(self) -> tuple[bool, str]:
        if not self._running:
            return False, "not running"
        limit = self.settings.runner.unhealthy_after_secs
        now = time.monotonic()
        for tp, part in self._parts.items():
            if part.failing_since is not None and now - part.failing_since > limit:
                return (
                    False,
                    f"{tp.topic}[{tp.partition}] failing for {now - part.failing_since:.0f}s",
                )
        return True, "ok"

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "sink": self.sink.name,
            "group": self.group_id,
            "received": s.received,
            "written": s.written,
            "retried": s.retried,
            "dead_lettered": s.dead_lettered,
            "dropped": s.dropped,
            "commits": s.commits,
            "paused": sorted(
                f"{tp.topic}[{tp.partition}]"
                for tp, p in self._parts.items()
                if p.failing_since is not None
            ),
            "backpressured": sorted(
                f"{tp.topic}[{tp.partition}]" for tp, p in self._parts.items() if p.full
            ),
            "buffered": sum(len(p.records) for p in self._parts.values()),
            "lag": sum(self.lag().values()),
            "errors": dict(s.errors),
        }
