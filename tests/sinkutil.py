"""Helpers for the sink tests (the general ones are shipped in auditpipe.testing)."""

from __future__ import annotations

from typing import Any

from auditpipe.schemas import Event
from auditpipe.sinks import Sink
from auditpipe.sinks.runner import SinkRunner

from auditpipe.settings import Settings
from auditpipe.testing import committed, make_events, produce_events, run_until, wait_for

__all__ = [
    "committed",
    "deliver",
    "fast",
    "make_events",
    "produce_events",
    "run_until",
    "wait_for",
    "write_batches",
]


def fast(settings: Settings, **runner: Any) -> Settings:
    """Short session timeout: on Tansu a group's first join takes half of it."""
    update = {"session_timeout_secs": 2.0, "heartbeat_interval_secs": 0.5, **runner}
    return settings.model_copy(update={"runner": settings.runner.model_copy(update=update)})


async def deliver(sink: Sink, settings: Settings, events: list[Event], **runner: Any) -> SinkRunner:
    """Produce ``events``, run ``sink`` under a runner until all are written, stop."""
    s = fast(settings, **runner)
    await produce_events(s, events)
    r = SinkRunner(sink, s)
    await run_until(r, lambda: r.stats.written >= len(events), what=f"{len(events)} written")
    return r


async def write_batches(sink: Sink, *batches: Any) -> None:
    """Start ``sink``, write each batch in order, stop it (also when a write raises)."""
    await sink.start()
    try:
        for b in batches:
            await sink.write(b)
    finally:
        await sink.stop()
