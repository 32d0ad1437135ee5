"""Processor steps: pure functions of an event.

A step takes an event dict and returns the (possibly new) event, or ``None`` to drop it. It
never does I/O. It records what it did with :func:`record_step` (counts, never values). An
exception raised by a step dead-letters the event; it is never forwarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from auditpipe.schemas import Event, validate

Step = Callable[[Event], Event | None]


def record_step(
    event: Event, step: str, version: str, action: str, counts: Mapping[str, int] | None = None
) -> Event:
    """Append one entry to ``event["processing"]`` (a new list; the input is not mutated)."""
    entry = {
        "step": step,
        "version": version,
        "action": action,
        "ts_ms": time.time_ns() // 1_000_000,
        "counts": dict(counts or {}),
    }
    return {**event, "processing": [*event.get("processing", []), entry]}


def validate_step(event: Event) -> Event:
    """Check the event against the AuditEvent schema; raises EventValidationError if it fails."""
    validate(event)
    return record_step(event, "validate", "1", "validated")


DEFAULT_STEPS: tuple[Step, ...] = (validate_step,)
