"""Helpers for the sink tests: ~2 KB events, a fast consumer group, running a runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from auditpipe.schemas import Event, encode, new_event
from auditpipe.sinks import Sink
from auditpipe.sinks.runner import SinkRunner

from auditpipe.settings import Settings

from .kafkautil import produce


def fast(settings: Settings, **runner: Any) -> Settings:
    """Short session timeout: on Tansu a group's first join takes half of it."""
    update = {"session_timeout_secs": 2.0, "heartbeat_interval_secs": 0.5, **runner}
    return settings.model_copy(update={"runner": settings.runner.model_copy(update=update)})


def make_events(n: int, size: int = 2000, ts_ms: int | None = None, **fields: Any) -> list[Event]:
    """``n`` events of about ``size`` bytes in the JSON rendering (chat-completion shaped)."""
    text = "x" * max(0, size - 900)
    out = []
    for i in range(n):
        extra = {"ts_ms": ts_ms} if ts_ms is not None else {}
        out.append(
            new_event(
                request_id=f"r{i}",
                model="m",
                endpoint="/v1/chat/completions",
                status_code=200,
                metadata={"ticket": f"T-{i % 7}"},
                input={"model": "m", "temperature": 0.2, "messages": [
                    {"role": "user", "content": f"q{i} {text}"}]},
                output={"model": "m-2024", "choices": [
                    {"message": {"role": "assistant", "content": "a"}}]},
                usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
                latency_ms=12.5,
                **extra,
                **fields,
            )
        )  # fmt: skip
    return out


async def produce_events(settings: Settings, events: list[Event]) -> None:
    await produce(settings.kafka.bootstrap or "", settings.kafka.events_topic,
                  [encode(e) for e in events])  # fmt: skip


async def run_until(
    runner: SinkRunner, done: Callable[[], Any], timeout_secs: float = 60.0, what: str = ""
) -> None:
    """Run ``runner`` until ``done()``; then stop it. Fails after ``timeout_secs``."""
    task = asyncio.create_task(runner.run())
    try:
        deadline = time.monotonic() + timeout_secs
        while not done():
            if task.done():
                task.result()
                raise AssertionError("runner returned before the condition held")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_secs}s waiting for {what or 'the runner'}: "
                    f"{runner.snapshot()}"
                )
            await asyncio.sleep(0.02)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)


async def wait_for(done: Callable[[], Any], timeout_secs: float, what: str) -> None:
    deadline = time.monotonic() + timeout_secs
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_secs}s waiting for {what}")
        await asyncio.sleep(0.02)


async def committed(settings: Settings, group: str) -> int:
    """Sum of the group's committed offsets over the events topic's partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, group_id=group)
    await consumer.start()
    try:
        total = 0
        for p in range(settings.kafka.partitions):
            total += await consumer.committed(TopicPartition(settings.kafka.events_topic, p)) or 0
        return total
    finally:
        await consumer.stop()


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
