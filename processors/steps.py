"""Processor steps: pure functions of an event.

A step takes an event dict and returns the (possibly new) event, or ``None`` to drop it. It
never does I/O. It records what it did with :func:`record_step` (counts, never values). An
exception raised by a step dead-letters the event; it is never forwarded. ``Step`` and
``record_step`` live in :mod:`auditpipe.steps` (shared with the producer and the sinks).
"""

from __future__ import annotations

from auditpipe.schemas import Event, validate

from auditpipe.steps import Step, record_step


def validate_step(event: Event) -> Event:
    """Check the event against the AuditEvent schema; raises EventValidationError if it fails."""
    validate(event)
    return record_step(event, "validate", "1", "validated")


DEFAULT_STEPS: tuple[Step, ...] = (validate_step,)

__all__ = ["DEFAULT_STEPS", "Step", "record_step", "validate_step"]
