"""AuditProducer: a non-blocking ``emit()`` in front of a background Kafka sender.

Lifecycle: ``start()`` returns quickly (it does not wait for Kafka); ``emit()`` may be called
from any thread and never blocks or raises; ``stop()`` flushes what was emitted (bounded by
``producer.stop_timeout_secs``) and is safe without ``start()`` and safe twice.

The sender runs an asyncio loop of its own in a daemon thread, so neither the Kafka client nor
Avro encoding ever runs on the application's request path: ``emit()`` appends to a bounded
deque and, only when the sender is idle, wakes it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from auditpipe.schemas import Event, EventValidationError, encode

from auditpipe.kafka import producer_kwargs, require_bootstrap
from auditpipe.settings import Settings, load_settings, settings_path_from_env

log = logging.getLogger("auditpipe.producer")

_DRAIN_BATCH = 512


@dataclass
class ProducerStats:
    """Every emitted event ends up in exactly one of: sent, failed, dropped (by reason), queued."""

    emitted: int = 0
    sent: int = 0
    failed: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)

    def snapshot(self, queued: int, in_flight: int) -> dict[str, Any]:
        return {
            "emitted": self.emitted,
            "sent": self.sent,
            "failed": self.failed,
            "dropped": dict(self.dropped),
            "queued": queued,
            "in_flight": in_flight,
        }


class AuditProducer:
    """Sends audit events to ``kafka.raw_topic``. See the module docstring for the contract."""

    def __init__(self, settings: Settings | None = None, *, bootstrap: str | None = None) -> None:
        self.settings = settings or load_settings(settings_path_from_env())
        if bootstrap:
            self.settings = self.settings.model_copy(
                update={"kafka": self.settings.kafka.model_copy(update={"bootstrap": bootstrap})}
            )
        require_bootstrap(self.settings.kafka)
        self._max_queue = self.settings.producer.queue_max_events
        self._buf: collections.deque[Event] = collections.deque()
        self._stats = ProducerStats()
        self._in_flight = 0
        self._accepting = False
        self._idle = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()

    # -- request path --------------------------------------------------------------------------

    def emit(self, event: Event) -> bool:
        """Queue ``event`` for sending. Returns False (and counts why) when it was dropped."""
        try:
            if not self._accepting:
                self._stats.dropped["not_running"] += 1
                return False
            if len(self._buf) >= self._max_queue:
                self._stats.dropped["queue_full"] += 1
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

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> AuditProducer:
        with self._lock:
            if self._thread is not None:
                return self
            self._accepting = True
            self._thread = threading.Thread(
                target=self._thread_main, name="auditpipe-producer", daemon=True
            )
            self._thread.start()
        self._ready.wait(5.0)
        return self

    def stop(self, timeout_secs: float | None = None) -> dict[str, Any]:
        """Stop accepting, flush queued events to Kafka, close. Returns the final stats."""
        with self._lock:
            self._accepting = False
            thread = self._thread
        if thread is not None:
            self._wakeup()
            thread.join(timeout_secs or self.settings.producer.stop_timeout_secs + 5.0)
        return self.stats()

    async def astop(self, timeout_secs: float | None = None) -> dict[str, Any]:
        """``stop()`` for async callers (runs the blocking join in a worker thread)."""
        return await asyncio.to_thread(self.stop, timeout_secs)

    def flush(self, timeout_secs: float = 10.0) -> bool:
        """Wait until every event emitted so far was acknowledged or failed. True if so."""
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            if not self._buf and self._in_flight == 0:
                return True
            time.sleep(0.005)
        return False

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot(len(self._buf), self._in_flight)

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
            self._loop = None
            loop.close()
            self._ready.set()

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        self._wake = asyncio.Event()
        self._ready.set()
        settings = self.settings
        topic = settings.kafka.raw_topic
        source = settings.source
        producer: AIOKafkaProducer | None = None
        backoff = 0.1
        stop_deadline: float | None = None
        while True:
            if not self._accepting and stop_deadline is None:
                stop_deadline = time.monotonic() + settings.producer.stop_timeout_secs
            if stop_deadline is not None and (not self._buf or time.monotonic() > stop_deadline):
                break
            if producer is None:
                candidate = AIOKafkaProducer(**producer_kwargs(settings.kafka, settings.producer))
                try:
                    await candidate.start()
                    producer, backoff = candidate, 0.1
                except Exception as exc:
                    await candidate.stop()
                    log.warning("Kafka not reachable yet (%s); retrying in %.1fs", exc, backoff)
                    await self._idle_wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            if not self._buf:
                if not self._accepting:
                    continue
                await self._idle_wait(None)
                continue
            await self._send_batch(producer, topic, source.service, source.instance)
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), settings.producer.stop_timeout_secs)
            except Exception as exc:
                log.warning("producer did not flush cleanly on stop: %s", exc)

    async def _idle_wait(self, wait_secs: float | None) -> None:
        assert self._wake is not None
        self._idle = True
        if not self._buf or wait_secs is not None:
            try:
                await asyncio.wait_for(self._wake.wait(), wait_secs)
            except TimeoutError:
                pass
        self._wake.clear()
        self._idle = False

    async def _send_batch(
        self, producer: Any, topic: str, service: str | None, instance: str | None
    ) -> None:
        buf = self._buf
        for _ in range(min(len(buf), _DRAIN_BATCH)):
            event = buf.popleft()
            src = event.get("source")
            if service or instance:
                if not src or (src.get("service") is None and src.get("instance") is None):
                    event["source"] = {"service": service, "instance": instance}
            try:
                value = encode(event)
            except EventValidationError as exc:
                self._stats.dropped["invalid_event"] += 1
                log.debug("dropping invalid event: %s", exc)
                continue
            self._in_flight += 1
            try:
                fut = await producer.send(topic, value, key=str(event["event_id"]).encode())
            except Exception:
                self._in_flight -= 1
                self._stats.failed += 1
                continue
            fut.add_done_callback(self._on_delivery)

    def _on_delivery(self, fut: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        if fut.cancelled() or fut.exception() is not None:
            self._stats.failed += 1
        else:
            self._stats.sent += 1
