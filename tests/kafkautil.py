"""Small helpers for tests that read and write topics directly."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from auditpipe.broker import EMBEDDED_HEARTBEAT_INTERVAL_SECS, EMBEDDED_SESSION_TIMEOUT_SECS


async def produce(
    bootstrap: str, topic: str, values: list[bytes], key: bytes | None = None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int, timeout_secs: float = 30.0) -> list[Any]:
    """Read ``count`` records from the start of ``topic`` (fails after ``timeout_secs``)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-reader-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=int(EMBEDDED_SESSION_TIMEOUT_SECS * 1000),  # first join: half of it
        heartbeat_interval_ms=int(EMBEDDED_HEARTBEAT_INTERVAL_SECS * 1000),
    )
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + timeout_secs
    try:
        while len(records) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                records.extend(msgs)
    finally:
        await consumer.stop()
    assert len(records) >= count, f"{topic}: got {len(records)} record(s), expected {count}"
    return records


def run(coro: Any) -> Any:
    return asyncio.run(coro)
