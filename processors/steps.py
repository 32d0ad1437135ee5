"""Processor steps: pure functions of an event.

A step takes an event dict and returns the (possibly new) event, or ``None`` to drop it. It
never does I/O. It records what it did with :func:`record_step` (counts, never values). An
exception raised by a step dead-letters the event; it is never forwarded. The step types and
the registry live in :mod:`auditpipe.steps` (shared with the producer and the sinks).
"""

from __future__ import annotations

from auditpipe.schemas import Event, validate

from auditpipe.steps import ProcessorStep, Step, record_step


def validate_step(event: Event) -> Event:
    """Check the event against the AuditEvent schema; raises EventValidationError if it fails."""
    validate(event)
    return record_step(event, "validate", "1", "validated")


__all__ = ["ProcessorStep", "Step", "record_step", "validate_step"]
