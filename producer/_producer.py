"""AuditProducer: a non-blocking ``emit()`` in front of a background sender.

Lifecycle: ``start()`` returns quickly (it does not wait for Kafka); ``emit()`` may be called
from any thread and never raises; it never blocks unless ``producer.when_full = "block"``, and
then for at most ``block_timeout_ms``. ``stop()`` flushes what was emitted (bounded by
``producer.stop_timeout_secs``; with the spool, what Kafka did not take stays on disk for the
next start) and is safe without ``start()`` and safe twice.

The sender runs an asyncio loop of its own in a daemon thread, so neither the Kafka client, nor
Avro encoding, nor building events from captured bytes, nor disk I/O ever runs on the request
path: ``emit()`` appends to a bounded deque and, only when the sender is idle, wakes it.

Sharing the GIL: the middleware and ``capture()`` note when the request path is active. While
it is, and the backlog is small (under a quarter of the queue), the sender does not compete:
it waits (at most ``_DEFER_MAX_SECS`` at a time) and works in the gaps between requests, and
emit() does not wake it (it polls every ``_DEFER_STEP_SECS``); when it works, it yields the GIL
every 50 us. With no request activity it yields every 2 ms, which is what sustained throughput
needs (a yield costs ~90 us of idle time).

Accounting: every emitted item ends in exactly one of ``sent`` (acknowledged by Kafka, or
written to stdout), ``skipped`` (a lazy capture that turned out not to be stored), ``dropped``
(by reason), the spool (``spool_pending``), the queue or in flight. ``spooled`` and
``replayed`` count the spool's traffic.

Redaction (``producer.redact = true``): the redact step, configured by ``[pipeline.redact]``
(the processors' policy), runs on every event in the sender thread, never on the request
path, before the event is written to stdout, to the spool or to Kafka. An event it fails on is
dropped and counted (``redact_failed``): it never leaves the process unredacted. What was
spooled before redaction was turned on is replayed as it was written.

Overflow (``producer.when_full``):

- ``spool`` (default): when Kafka is unreachable, a send waits longer than ``spill_after_ms``,
  or ``max_in_flight_events`` are unacknowledged, events are encoded and appended to the disk
  spool; while the spool holds anything, new events go behind it, so replay keeps their order.
  Replay starts once a Kafka connection works again (also after a restart).
- ``drop_newest``: events wait in the queue; a full queue drops the new event.
- ``block``: like drop_newest, but emit() first waits up to ``block_timeout_ms`` for space.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any

from auditpipe.schemas import (
    Event,
    EventValidationError,
    encode,
    latest_schema_id,
    peek_event_id,
    to_json,
)

from auditpipe.kafka import client_kwargs, connect_problem, producer_kwargs
from auditpipe.retry import Backoff
from auditpipe.settings import Settings, load_settings, settings_path_from_env

from ._spool import Spool, SpoolError, WriteFn

log = logging.getLogger("auditpipe.producer")

_DRAIN_BATCH = 512
_DRAIN_BATCH_ACTIVE = 64  # while requests come: handing a batch over is one stretch of GIL
_REPLAY_BATCH = 2000
_SPOOL_SLOTS = 64

# Sharing the GIL with the request path (see AuditProducer._pace). The middleware stamps
# ``_request_seen`` when a request starts, sends body messages and ends; the request path counts
# as active for _QUIET_SECS after that.
_HOLD_BUSY_SECS = 50e-6  # longest stretch the sender holds the GIL while requests are active
_HOLD_IDLE_SECS = 2e-3  # ... while the request path is quiet (each yield costs ~90 us idle)
_QUIET_SECS = 1e-3
_DEFER_STEP_SECS = 0.02  # while requests are active, the sender waits in steps of this ...
_DEFER_MAX_SECS = 0.1  # ... for at most this long, and only while the queue is under 1/4 full
_POLL_WHILE_ACTIVE_SECS = 1.0  # an idle sender polls (emit() does not wake it) this long after

#: Upper bounds (seconds) of the send-latency histogram buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: An item of the queue: a ready event, or a function that builds one (None: not captured).
Item = Event | Callable[[], Event | None]


@dataclass
class ProducerStats:
    emitted: int = 0
    sent: int = 0
    failed: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe_latency(self, secs: float, count: int = 1) -> None:
        i = 0
        for i, bound in enumerate(LATENCY_BUCKETS):  # noqa: B007
            if secs <= bound:
                break
        else:
            i = len(LATENCY_BUCKETS)
        self.latency_buckets[i] += count
        self.latency_sum += secs * count


class AuditProducer:
    """Sends audit events to ``kafka.raw_topic`` (or stdout). See the module docstring."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        bootstrap: str | None = None,
        stream: IO[str] | None = None,
        spool_write_fn: WriteFn | None = None,
    ) -> None:
        """``stream``: where the stdout transport writes (default ``sys.stdout``).
        ``spool_write_fn``: replaces ``os.write`` for spool segments (fault injection)."""
        self.settings = settings or load_settings(settings_path_from_env())
        if bootstrap:
            self.settings = self.settings.model_copy(
                update={"kafka": self.settings.kafka.model_copy(update={"bootstrap": bootstrap})}
            )
        cfg = self.settings.producer
        self.enabled = cfg.enabled
        if self.enabled and cfg.transport == "kafka":
            client_kwargs(self.settings.kafka)  # bootstrap, certificates, secrets: fail here
        self._cfg = cfg
        self._stream = stream
        self._spool_write_fn = spool_write_fn
        self._max_queue = cfg.queue_max_events
        self._buf: collections.deque[Item] = collections.deque()
        self._stats = ProducerStats()
        self._pending: dict[int, tuple[float, list[bytes]]] = {}  # aiokafka batches in flight
        self._in_flight = 0  # events in those batches
        self._last_progress = 0.0
        self._rr = 0
        self._last_yield = 0.0
        self._request_seen = 0.0  # perf_counter() of the request path's last activity
        self._defer_since: float | None = None
        self._defer_backlog = max(self._max_queue // 4, 1)
        source = self.settings.source
        self._source = (
            {"service": source.service, "instance": source.instance}
            if source.service or source.instance
            else None
        )
        self._schema_id = latest_schema_id()
        self._redact = self._redact_step() if self.enabled and cfg.redact else None
        self._seq = 0
        self._generation = 0
        self._spool: Spool | None = None
        self._kafka_up = False
        self._accepting = False
        self._idle = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._space = threading.Condition()
        self._blocked = 0

    def _redact_step(self) -> Callable[[Event], Event | None]:
        """The redact step of ``[pipeline.redact]`` (invalid settings raise ConfigError)."""
        from auditpipe.steps import build_step

        table = self.settings.pipeline.get("redact")
        return build_step("redact", table if isinstance(table, dict) else None, "settings")

    # -- request path --------------------------------------------------------------------------

    def emit(self, event: Item) -> bool:
        """Queue ``event`` (or a function building it) for sending.

        Returns False, and counts why, when it was dropped. Never raises.
        """
        try:
            if not self._accepting:
                if self.enabled:
                    self._stats.dropped["not_running"] += 1
                return False
            if len(self._buf) >= self._max_queue and not self._wait_for_space():
                return False
            self._buf.append(event)
            self._stats.emitted += 1
            if self._idle:
                self._idle = False
                loop, wake = self._loop, self._wake
                if loop is not None and wake is not None:
                    loop.call_soon_threadsafe(wake.set)
            return True
        except Exception:  # never raise into the caller
            self._stats.dropped["internal_error"] += 1
            return False

    def _wait_for_space(self) -> bool:
        if self._cfg.when_full != "block":
            self._stats.dropped["queue_full"] += 1
            return False
        deadline = time.monotonic() + self._cfg.block_timeout_ms / 1000
        with self._space:
            self._blocked += 1
            try:
                while len(self._buf) >= self._max_queue:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._accepting:
                        self._stats.dropped["block_timeout"] += 1
                        return False
                    self._space.wait(left)
            finally:
                self._blocked -= 1
        return True

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> AuditProducer:
        """Start the sender thread (no-op when disabled or already started)."""
        with self._lock:
            if self._thread is not None or not self.enabled:
                return self
            self._accepting = True
            self._thread = threading.Thread(
                target=self._thread_main, name="auditpipe-producer", daemon=True
            )
            self._thread.start()
        self._ready.wait(5.0)
        return self

    def stop(self, timeout_secs: float | None = None) -> dict[str, Any]:
        """Stop accepting, flush (Kafka, else spool), close. Returns the final stats."""
        with self._lock:
            self._accepting = False
            thread = self._thread
        with self._space:
            self._space.notify_all()
        if thread is not None:
            self._wakeup()
            thread.join(timeout_secs or self._cfg.stop_timeout_secs + 5.0)
        return self.stats()

    async def astop(self, timeout_secs: float | None = None) -> dict[str, Any]:
        """``stop()`` for async callers (runs the blocking join in a worker thread)."""
        return await asyncio.to_thread(self.stop, timeout_secs)

    def flush(self, timeout_secs: float = 10.0) -> bool:
        """Wait until every event emitted so far was delivered, dropped or spooled. True if so."""
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            if not self._buf and not self._pending and not self._busy:
                return True
            time.sleep(0.005)
        return False

    _busy = False

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see the module docstring for what adds up)."""
        s = self._stats
        spool = self._spool
        return {
            "emitted": s.emitted,
            "sent": s.sent,
            "failed": s.failed,
            "spooled": s.spooled,
            "replayed": s.replayed,
            "dropped": dict(s.dropped),
            "skipped": dict(s.skipped),
            "queued": len(self._buf),
            "in_flight": self._in_flight,
            "spool_bytes": spool.size_bytes if spool else 0,
            "spool_pending": 0 if spool is None or spool.empty else 1,
            "spool_corrupt_records": spool.corrupt_records if spool else 0,
            "spool_corrupt_bytes": spool.corrupt_bytes if spool else 0,
            "kafka_connected": self._kafka_up,
            "send_latency_buckets": list(s.latency_buckets),
            "send_latency_sum": s.latency_sum,
        }

    def __enter__(self) -> AuditProducer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- sender thread -------------------------------------------------------------------------

    def _wakeup(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # loop closed meanwhile
                pass

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

    def _open_spool(self) -> Spool | None:
        """The spool at ``spool_dir``; when another process holds it (several server workers
        with one configuration), the first free of ``spool_dir.1`` ... ``.63``."""
        cfg = self._cfg
        directory = cfg.spool_dir or os.path.join(
            tempfile.gettempdir(), "auditpipe-spool", self.settings.kafka.raw_topic
        )
        kwargs = {"write_fn": self._spool_write_fn} if self._spool_write_fn else {}
        error: SpoolError | None = None
        for slot in range(_SPOOL_SLOTS):
            path = directory if slot == 0 else f"{directory}.{slot}"
            try:
                return Spool(path, cfg.spool_max_bytes, cfg.spool_segment_bytes, **kwargs).open()
            except SpoolError as exc:
                error = error or exc
                if "in use" not in str(exc):
                    break
        log.error("disk spool disabled: %s", error)
        return None

    def _take(self, limit: int) -> list[Event]:
        """Pop up to ``limit`` items and turn them into events (building lazy captures)."""
        buf, out = self._buf, []
        for _ in range(min(len(buf), limit)):
            event = self._build(buf.popleft())
            self._pace()
            if event is not None:
                out.append(event)
        self._wake_blocked()
        return out

    def _build(self, item: Item) -> Event | None:
        """The queued event, or the event of a lazy capture, redacted when ``redact`` is on;
        None (counted) when building or redacting it failed or it is not to be stored."""
        if isinstance(item, dict):
            built: Event | None = item
        else:
            try:
                built = item()
            except Exception:
                self._stats.dropped["capture_error"] += 1
                log.debug("could not build audit event", exc_info=True)
                return None
            if built is None:
                self._stats.skipped["not_stored"] += 1
                return None
        if self._redact is not None and built is not None:
            try:
                built = self._redact(built)
            except Exception:  # fail closed: an event that could not be redacted never leaves
                built = None
                log.debug("could not redact audit event", exc_info=True)
            if built is None:
                self._stats.dropped["redact_failed"] += 1
        return built

    def _wake_blocked(self) -> None:
        """Wake emit() calls waiting for space (``when_full = "block"``)."""
        if self._blocked:
            with self._space:
                self._space.notify_all()

    def _stamp_source(self, event: Event) -> None:
        source = self._source
        if source is not None:
            src = event.get("source")
            if not src or (src.get("service") is None and src.get("instance") is None):
                event["source"] = dict(source)

    def _requests_active(self, now: float, within: float = _QUIET_SECS) -> bool:
        return now - self._request_seen < within

    def _pace(self, coarse: bool = False) -> bool:
        """Called between events in every loop of the sender. Yields the GIL when this thread
        has held it long enough: ``_HOLD_BUSY_SECS`` while the request path is active (a request
        that wants the GIL otherwise waits for the interpreter's switch interval, 5 ms), else
        ``_HOLD_IDLE_SECS`` (a yield costs ~90 us of idle time, so this keeps throughput up
        when no request is waiting). ``coarse``: always the latter (handing a batch over to
        aiokafka costs ~1.5 us per event; one stall per batch beats several). Returns whether
        the request path is active."""
        now = time.perf_counter()
        busy = now - self._request_seen < _QUIET_SECS
        fine = busy and not coarse
        if now - self._last_yield > (_HOLD_BUSY_SECS if fine else _HOLD_IDLE_SECS):
            time.sleep(0)
            self._last_yield = time.perf_counter()
        return busy

    def _should_defer(self) -> bool:
        """While requests are running and the backlog is small, the sender stays out of their
        way (it works in their gaps), for at most ``_DEFER_MAX_SECS`` at a time."""
        now = time.perf_counter()
        if not self._accepting or not self._requests_active(now):
            self._defer_since = None
            return False
        if len(self._buf) >= self._defer_backlog:
            return False
        if self._defer_since is None:
            self._defer_since = now
        return now - self._defer_since < _DEFER_MAX_SECS

    def _take_values(self, limit: int) -> tuple[list[bytes], list[bytes | None]]:
        """Pop up to ``limit`` items, build and encode them: (values, their keys).

        Stops early when the request path becomes active and the sender may defer; what it
        did not pop stays queued, in order.
        """
        buf, values, keys = self._buf, [], []
        for _ in range(min(len(buf), limit)):
            event = self._build(buf.popleft())
            value = None if event is None else self._encode(event)
            if event is None or value is None:
                continue
            values.append(value)
            event_id = event.get("event_id")
            keys.append(event_id.encode() if isinstance(event_id, str) else None)
            if self._pace() and self._should_defer():
                break
        self._wake_blocked()
        return values, keys

    def _encode(self, event: Event) -> bytes | None:
        """The event's Avro value (source stamped), or None (counted) when it does not fit."""
        self._stamp_source(event)
        try:
            return encode(event, self._schema_id)
        except EventValidationError as exc:
            self._stats.dropped["invalid_event"] += 1
            log.debug("dropping invalid event: %s", exc)
            return None

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

    # -- Kafka ---------------------------------------------------------------------------------

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
            if stopping and (time.monotonic() > stop_deadline or self._drained()):  # type: ignore[operator]
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

    def _spool_events(self, events: list[Event]) -> None:
        spool = self._spool
        assert spool is not None
        for event in events:
            self._pace()
            value = self._encode(event)
            if value is not None:
                self._spool_value(value)
        self._flush_spool()

    def _spool_value(self, value: bytes) -> None:
        assert self._spool is not None
        reason = self._spool.append(value)
        if reason is None:
            self._stats.spooled += 1
        else:
            self._stats.dropped[reason] += 1

    def _flush_spool(self) -> None:
        assert self._spool is not None
        dropped, reason = self._spool.flush()
        if dropped:
            self._stats.spooled -= dropped
            self._stats.dropped[reason or "spool_error"] += dropped

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
        if exc is not None and not getattr(exc, "retriable", True):
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
        if rest or any(getattr(r, "retriable", True) for r in failed):
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

    async def _idle_wait(self, wait_secs: float | None, wakeable: bool = True) -> None:
        """Wait for ``wait_secs`` (None: until woken). ``wakeable``: emit() may wake us early
        (stop() always can)."""
        assert self._wake is not None
        self._idle = wakeable
        if not self._buf or wait_secs is not None:
            try:
                await asyncio.wait_for(self._wake.wait(), wait_secs)
            except TimeoutError:
                pass
        self._wake.clear()
        self._idle = False


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
