"""The sender: the producer's own thread and event loop, the stdout transport, and Kafka
(connecting with backoff, handing batches to aiokafka, tracking acknowledgements, spilling to
the spool when Kafka is away or slow, replaying the spool when it is back)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from functools import partial
from typing import Any

from auditpipe.schemas import peek_event_id, to_json

from auditpipe.kafka import connect_problem, producer_kwargs
from auditpipe.retry import Backoff, is_permanent

from ._pacing import _DEFER_STEP_SECS, _POLL_WHILE_ACTIVE_SECS
from ._spooling import Spooling

log = logging.getLogger("auditpipe.producer")

_DRAIN_BATCH = 512
_DRAIN_BATCH_ACTIVE = 64  # while requests come: handing a batch over is one stretch of GIL
_REPLAY_BATCH = 2000


class Sender(Spooling):
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._run())
        except Exception:
            log.exception("auditpipe producer sender crashed")
        finally:
            self._accepting = False
            lost = len(self._buf)
            if lost:
                self._stats.dropped["stopped_unsent"] += lost
                self._buf.clear()
            if self._spool is not None:
                self._spool.close()
            self._loop = None
            _cancel_leftovers(loop)  # aiokafka tasks of a producer whose stop() timed out
            loop.close()
            self._ready.set()

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        if self._cfg.transport == "stdout":
            self._ready.set()
            await self._run_stdout()
            return
        if self._cfg.when_full == "spool":
            self._spool = self._open_spool()
        self._ready.set()
        await self._run_kafka()

    async def _run_stdout(self) -> None:
        deadline: float | None = None
        while True:
            if not self._buf:
                if not self._accepting:
                    return
                await self._idle_wait(None)
                continue
            if not self._accepting and deadline is None:
                deadline = time.monotonic() + self._cfg.stop_timeout_secs
            stream = self._stream or sys.stdout
            self._busy = True
            lines = []
            for event in self._take(_DRAIN_BATCH):
                self._stamp_source(event)
                try:
                    lines.append(to_json(event).decode())
                except TypeError:
                    self._stats.dropped["invalid_event"] += 1
            try:
                stream.write("".join(line + "\n" for line in lines))
                stream.flush()
                self._stats.sent += len(lines)
            except Exception:
                self._stats.dropped["stdout_error"] += len(lines)
            self._busy = False

    async def _run_kafka(self) -> None:
        from aiokafka import AIOKafkaProducer

        cfg = self._cfg
        topic = self.settings.kafka.raw_topic
        producer: AIOKafkaProducer | None = None
        backoff = Backoff(0.1, 5.0)
        next_attempt = 0.0
        stop_deadline: float | None = None
        while True:
            if not self._accepting and stop_deadline is None:
                stop_deadline = time.monotonic() + cfg.stop_timeout_secs
            stopping = stop_deadline is not None
            if stop_deadline is not None and (time.monotonic() > stop_deadline or self._drained()):
                break
            if producer is not None and self._stalled():
                log.warning("Kafka stopped acknowledging; spooling until it is back")
                await self._abandon(producer)
                producer = None
            if producer is None and time.monotonic() >= next_attempt:
                candidate = AIOKafkaProducer(**producer_kwargs(self.settings.kafka, cfg))
                try:
                    await asyncio.wait_for(candidate.start(), max(cfg.spill_after_ms / 1000, 1.0))
                    producer = candidate
                    backoff.reset()
                    self._kafka_up = True
                except Exception as exc:
                    await _quiet_stop(candidate, 1.0)
                    why = await connect_problem(self.settings.kafka) or exc
                    delay = backoff.next()
                    log.warning("Kafka not reachable (%s); retrying in %.1fs", why, delay)
                    next_attempt = time.monotonic() + delay
            if producer is None:
                if self._spool is not None and self._buf:
                    self._busy = True
                    self._spool_events(self._take(_DRAIN_BATCH))
                    self._busy = False
                    continue
                await self._idle_wait(max(next_attempt - time.monotonic(), 0.01))
                continue
            spool = self._spool
            if spool is not None and not spool.empty:
                self._busy = True
                if self._buf:
                    self._spool_events(self._take(_DRAIN_BATCH * 4))
                if not self._pending:
                    ok = await self._replay(producer, topic)
                    if not ok:
                        await self._abandon(producer)
                        producer = None
                self._busy = False
                if self._pending:
                    await self._idle_wait(0.01)
                continue
            if not self._buf:
                if stopping:
                    if not self._pending:
                        break
                    await self._idle_wait(0.01)
                    continue
                if self._requests_active(time.perf_counter(), _POLL_WHILE_ACTIVE_SECS):
                    # a wakeup from emit() would take the GIL from the request that emitted:
                    # while requests come, look for new events every _DEFER_STEP_SECS instead
                    await self._idle_wait(_DEFER_STEP_SECS, wakeable=False)
                else:
                    await self._idle_wait(0.05 if self._pending else None)
                continue
            if self._in_flight >= cfg.max_in_flight_events:
                if spool is not None:
                    self._busy = True
                    self._spool_events(self._take(_DRAIN_BATCH))
                    self._busy = False
                else:
                    await self._idle_wait(0.01)
                continue
            if self._should_defer():
                await self._idle_wait(_DEFER_STEP_SECS, wakeable=False)
                continue
            self._busy = True
            active = self._requests_active(time.perf_counter(), _POLL_WHILE_ACTIVE_SECS)
            limit = _DRAIN_BATCH_ACTIVE if active else _DRAIN_BATCH
            ok = await self._send_batch(producer, topic, limit)
            self._busy = False
            if not ok:
                await self._abandon(producer)
                producer = None
        if producer is not None:
            await self._abandon(producer, final=True)
        if self._spool is not None and self._buf:  # the stop deadline passed: keep them on disk
            self._spool_events(self._take(len(self._buf)))
        self._kafka_up = False

    def _drained(self) -> bool:
        if self._buf or self._pending:
            return False
        return self._spool is None or self._spool.empty or not self._kafka_up

    def _stalled(self) -> bool:
        """Unacknowledged sends and no acknowledgement for ``spill_after_ms``."""
        if not self._pending:
            return False
        return time.monotonic() - self._last_progress > self._cfg.spill_after_ms / 1000

    async def _hand_over(
        self,
        producer: Any,
        topic: str,
        values: list[bytes],
        keys: list[bytes | None] | None = None,
    ) -> tuple[list[tuple[asyncio.Future[Any], list[bytes]]], list[bytes]]:
        """Give ``values`` to aiokafka in record batches (one partition per batch, round robin).

        Returns (futures with the values each covers, values not handed over because Kafka did
        not take them within ``spill_after_ms``). ``keys``: the record keys (event ids) when
        known, else they are read back from the values. Never raises.
        """
        handed: list[tuple[asyncio.Future[Any], list[bytes]]] = []
        done = 0  # values[:done] are in aiokafka's hands
        try:
            async with asyncio.timeout(self._cfg.spill_after_ms / 1000):
                partitions = sorted(await producer.partitions_for(topic))
                while done < len(values):
                    batch = producer.create_batch()
                    i = done
                    while i < len(values):
                        v = values[i]
                        key = keys[i] if keys is not None else peek_event_id(v)
                        if batch.append(key=key, value=v, timestamp=None) is None:
                            break
                        i += 1
                        self._pace(coarse=True)
                    if i == done:  # one record larger than a batch: let aiokafka size it
                        v = values[i]
                        key = keys[i] if keys is not None else peek_event_id(v)
                        fut = await producer.send(topic, v, key=key)
                        i += 1
                    else:
                        self._rr = (self._rr + 1) % len(partitions)
                        part = partitions[self._rr]
                        fut = await producer.send_batch(batch, topic, partition=part)
                    handed.append((fut, values[done:i]))
                    done = i
        except Exception as exc:  # timeout waiting for metadata/buffer space, or a send error
            log.debug("send interrupted: %r", exc)
        return handed, values[done:]

    async def _send_batch(self, producer: Any, topic: str, limit: int) -> bool:
        """Build, encode and hand up to ``limit`` queued events to aiokafka. False when Kafka
        does not take them in time."""
        values, keys = self._take_values(limit)
        self._defer_since = None  # under steady traffic: defer, send a batch, defer again
        if not values:
            return True
        if not self._pending:
            self._last_progress = time.monotonic()
        handed, rest = await self._hand_over(producer, topic, values, keys)
        for fut, covered in handed:
            self._track(fut, covered)
        if rest:
            if self._spool is not None:
                for value in rest:
                    self._spool_value(value)
                self._flush_spool()
            else:
                self._stats.failed += len(rest)
                self._stats.dropped["send_failed"] += len(rest)
            return False
        return True

    def _track(self, fut: asyncio.Future[Any], values: list[bytes]) -> None:
        self._seq += 1
        self._pending[self._seq] = (time.monotonic(), values)
        self._in_flight += len(values)
        fut.add_done_callback(partial(self._on_delivery, self._seq, self._generation))

    def _on_delivery(self, seq: int, generation: int, fut: asyncio.Future[Any]) -> None:
        entry = self._pending.pop(seq, None)
        if entry is None or generation != self._generation:
            return  # abandoned: already spooled or counted
        sent_at, values = entry
        self._in_flight -= len(values)
        exc = None if fut.cancelled() else fut.exception()
        if not fut.cancelled() and exc is None:
            now = time.monotonic()
            self._last_progress = now
            self._stats.sent += len(values)
            self._stats.observe_latency(now - sent_at, len(values))
            return
        self._stats.failed += len(values)
        if exc is not None and is_permanent(exc):
            # Kafka refused these records (too large, invalid): retrying cannot help
            self._stats.dropped["kafka_rejected"] += len(values)
            log.warning("Kafka rejected %d event(s): %r", len(values), exc)
        elif self._spool is not None:
            for value in values:
                self._spool_value(value)
            self._flush_spool()
        else:
            self._stats.dropped["send_failed"] += len(values)

    async def _abandon(self, producer: Any, final: bool = False) -> None:
        """Close ``producer``; what it still holds goes to the spool (or counts as dropped)."""
        await _quiet_stop(producer, 2.0 if not final else self._cfg.stop_timeout_secs)
        self._kafka_up = False
        self._generation += 1
        pending, self._pending = self._pending, {}
        self._in_flight = 0
        values = [v for _, vs in pending.values() for v in vs]
        if not values:
            return
        if self._spool is not None:
            for value in values:
                self._spool_value(value)
            self._flush_spool()
        else:
            reason = "stopped_unsent" if final else "send_failed"
            self._stats.dropped[reason] += len(values)

    async def _replay(self, producer: Any, topic: str) -> bool:
        """Send the next spool batch and wait for it. False (spool rewound) on failure."""
        spool = self._spool
        assert spool is not None
        values, token = spool.read_batch(_REPLAY_BATCH)
        if not values:
            spool.commit(token)  # only corrupt bytes were left
            return True
        handed, rest = await self._hand_over(producer, topic, values)
        results: list[Any] = []
        if not rest:
            try:
                async with asyncio.timeout(max(self._cfg.spill_after_ms / 1000, 5.0)):
                    results = await asyncio.gather(*(f for f, _ in handed), return_exceptions=True)
            except Exception as exc:
                log.debug("replay interrupted: %r", exc)
                rest = values
        failed = [r for r in results if isinstance(r, BaseException)]
        if rest or not all(is_permanent(r) for r in failed):
            spool.rewind()
            return False
        rejected = sum(len(vs) for (_, vs), r in zip(handed, results, strict=True)
                       if isinstance(r, BaseException))  # fmt: skip
        if rejected:
            self._stats.dropped["kafka_rejected"] += rejected
        spool.commit(token)
        self._stats.replayed += len(values) - rejected
        self._stats.sent += len(values) - rejected
        return True


async def _quiet_stop(producer: Any, timeout_secs: float) -> None:
    try:
        await asyncio.wait_for(producer.stop(), timeout_secs)
    except Exception as exc:
        log.debug("producer stop: %r", exc)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        try:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        except Exception:
            pass
