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

The implementation is split by job, one module a layer: ``_pacing`` (sharing the GIL, waiting),
``_queue`` (building, redacting and encoding queued items), ``_spooling`` (the disk overflow),
``_sender`` (the thread, stdout, Kafka, replay), ``_stats`` (counters) and this module (the
public API); ``_state`` declares what they share.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from auditpipe.schemas import Event, latest_schema_id

from auditpipe.kafka import client_kwargs
from auditpipe.settings import Settings, load_settings, settings_path_from_env

from ._sender import Sender
from ._spool import WriteFn
from ._state import Item
from ._stats import LATENCY_BUCKETS, ProducerStats

__all__ = ["LATENCY_BUCKETS", "AuditProducer", "Item", "ProducerStats"]


class AuditProducer(Sender):
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
        self._buf = collections.deque()
        self._stats = ProducerStats()
        self._pending = {}  # aiokafka batches in flight
        self._in_flight = 0  # events in those batches
        self._last_progress = 0.0
        self._rr = 0
        self._last_yield = 0.0
        self._request_seen = 0.0  # perf_counter() of the request path's last activity
        self._defer_since = None
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
        self._spool = None
        self._kafka_up = False
        self._accepting = False
        self._idle = False
        self._loop = None
        self._wake = None
        self._thread = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._space = threading.Condition()
        self._blocked = 0

    def _redact_step(self) -> Callable[[Event], Event | None]:
        """The redact step of ``[pipeline.redact]`` (invalid settings raise ConfigError)."""
        from auditpipe.steps import build_step

        table = self.settings.pipeline.get("redact")
        return build_step("redact", table if isinstance(table, dict) else None, "settings")

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
