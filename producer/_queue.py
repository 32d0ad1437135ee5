"""Turning what ``emit()`` queued into events and Avro values: lazy captures built, the
redact step run (fail closed), the source stamped, the event encoded."""

from __future__ import annotations

import logging

from auditpipe.schemas import Event, EventValidationError, encode

from ._pacing import Pacing
from ._state import Item

log = logging.getLogger("auditpipe.producer")


class Queue(Pacing):
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

    def _stamp_source(self, event: Event) -> None:
        source = self._source
        if source is not None:
            src = event.get("source")
            if not src or (src.get("service") is None and src.get("instance") is None):
                event["source"] = dict(source)

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
