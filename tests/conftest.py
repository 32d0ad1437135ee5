"""Shared fixtures: one embedded broker per test session, isolated topics per test.

Kafka tests never skip: without ``AUDITPIPE_KAFKA_BOOTSTRAP`` the session starts the embedded
Tansu broker (the ``dev`` extra); if it cannot start, the fixture errors with the reason.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from auditpipe.broker import EmbeddedBroker, free_port, tune_for_embedded_broker
from auditpipe.kafka import ensure_topics
from auditpipe.settings import Settings, load_settings

from .tcpproxy import TcpProxy


@pytest.fixture
def proxied_broker() -> Iterator[tuple[EmbeddedBroker, TcpProxy]]:
    """A broker of this test's own, reachable only through a TCP proxy."""
    broker_port, proxy_port = free_port(), free_port()
    proxy = TcpProxy(broker_port, proxy_port).start()
    broker = EmbeddedBroker(port=broker_port, advertised_port=proxy_port)
    broker.start()
    try:
        yield broker, proxy
    finally:
        broker.stop()
        proxy.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    existing = os.environ.get("AUDITPIPE_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Any) -> Settings:
    """Settings on the session broker with topics of this test's own (created)."""
    suffix = uuid.uuid4().hex[:10]
    base = load_settings(env={})
    kafka = base.kafka.model_copy(
        update={
            "bootstrap": kafka_bootstrap,
            "raw_topic": f"t-{suffix}.raw",
            "events_topic": f"t-{suffix}.events",
            "dlq_topic": f"t-{suffix}.dlq",
            "partitions": 2,
        }
    )
    processors = base.processors.model_copy(
        update={
            "app_id": f"t-{suffix}-processors",
            "data_dir": str(tmp_path / "faust"),
        }
    )
    runner = base.runner.model_copy(update={"group_prefix": f"t-{suffix}-sink-"})
    s = base.model_copy(update={"kafka": kafka, "processors": processors, "runner": runner})
    s = tune_for_embedded_broker(s)  # short sessions: a first join on Tansu takes half of one
    asyncio.run(ensure_topics(s.kafka))
    return s


def wait_until(predicate: Callable[[], Any], timeout_secs: float, what: str) -> Any:
    """Poll ``predicate`` until truthy; fail naming ``what`` after ``timeout_secs``."""
    deadline = time.monotonic() + timeout_secs
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_secs}s waiting for {what}")
        time.sleep(0.02)


from .sinkfixtures import moto_s3, pg_dsn  # noqa: E402, F401  (fixtures for the sink tests)
