"""Shared fixtures: one embedded broker per test session, isolated topics per test.

Kafka tests never skip: without ``AUDITPIPE_KAFKA_BOOTSTRAP`` the session starts the embedded
Tansu broker (the ``dev`` extra); if it cannot start, the fixture errors with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from auditpipe.broker import EmbeddedBroker, free_port
from auditpipe.kafka import ensure_topics
from auditpipe.settings import Settings
from auditpipe.tcpproxy import TcpProxy
from auditpipe.testing import isolated_settings, kafka_bootstrap, wait_until


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


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Any) -> Settings:
    """Settings on the session broker with topics of this test's own (created)."""
    s = isolated_settings(kafka_bootstrap, data_dir=tmp_path / "faust")
    asyncio.run(ensure_topics(s.kafka))
    return s


from .sinkfixtures import moto_s3, pg_dsn  # noqa: E402, F401  (fixtures for the sink tests)

__all__ = ["kafka_bootstrap", "wait_until"]  # re-exported: the session fixture; tests import it
