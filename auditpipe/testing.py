"""Test support shipped with auditpipe: for our tests and for the tests of your own plugins.

- :func:`make_event` / :func:`make_events`: valid AuditEvents (chat-completion shaped), any
  field overridable.
- :func:`isolated_settings`: settings on a given broker with topics, consumer groups and the
  Faust app id of the test's own, so tests sharing one broker never see each other's records;
  :func:`create_topics` creates them.
- :func:`wait_until` / :func:`wait_for` (sync / async): poll a condition with a deadline and
  fail naming what was awaited. Tests wait on conditions, never on sleeps.
- :func:`produce_events`, :func:`consume` (:func:`reader` is the consumer it uses),
  :func:`run_until` (run a sink runner until a condition holds), :func:`committed` (a group's
  committed offsets).
- :class:`SinkContract`: the contract every sink passes. A sink's test module subclasses it,
  names the sink and says how to build it and how to read back what it stored::

      from auditpipe.testing import SinkContract, kafka_bootstrap  # noqa: F401 (the fixture)

      class TestMySink(SinkContract):
          sink_name = "mysink"          # the entry point name in auditpipe.sinks

          @pytest.fixture(autouse=True)
          def _store(self, tmp_path):    # whatever the sink needs, per test
              self.root = tmp_path

          def make_sink(self):
              return load_sink_class("mysink").from_mapping({"root": str(self.root)})

          def stored_ids(self):
              return [...]               # every stored event_id, duplicates included

- :func:`kafka_bootstrap`: a session fixture: ``AUDITPIPE_KAFKA_BOOTSTRAP`` when set, else the
  embedded broker (the ``dev`` extra). Import it into a ``conftest.py`` (or the test module).

This module imports pytest: import it from tests only (pytest is not a dependency of auditpipe).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition

from auditpipe.broker import (
    EMBEDDED_HEARTBEAT_INTERVAL_SECS,
    EMBEDDED_SESSION_TIMEOUT_SECS,
    EmbeddedBroker,
    tune_for_embedded_broker,
)
from auditpipe.errors import ConfigError
from auditpipe.kafka import ensure_topics
from auditpipe.schemas import Event, encode, new_event
from auditpipe.settings import Settings, load_settings
from auditpipe.sinks import Batch, Sink, load_sink_class
from auditpipe.sinks.runner import SinkRunner

__all__ = [
    "SinkContract",
    "committed",
    "consume",
    "create_topics",
    "isolated_settings",
    "kafka_bootstrap",
    "make_event",
    "make_events",
    "produce",
    "produce_events",
    "reader",
    "run_until",
    "wait_for",
    "wait_until",
]

# ---------------------------------------------------------------------------------------------
# Events


def make_event(**overrides: Any) -> Event:
    """One valid AuditEvent of a chat completion (about 1 KB of JSON); ``overrides`` replace
    fields (``event_id`` and ``ts_ms`` are fresh unless given). An unknown field name raises
    EventValidationError, as :func:`auditpipe.schemas.new_event` does."""
    fields: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "model": "m",
        "endpoint": "/v1/chat/completions",
        "status_code": 200,
        "metadata": {"ticket": "T-1"},
        "input": {"model": "m", "temperature": 0.2,
                  "messages": [{"role": "user", "content": "hello"}]},
        "output": {"model": "m-2024",
                   "choices": [{"message": {"role": "assistant", "content": "a"}}]},
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        "latency_ms": 12.5,
    }  # fmt: skip
    fields.update(overrides)
    return new_event(**fields)


def make_events(n: int, size: int = 2000, **overrides: Any) -> list[Event]:
    """``n`` events of about ``size`` bytes in the JSON rendering, ``request_id`` ``r0``..,
    ``metadata.ticket`` cycling over seven values; ``overrides`` apply to every one."""
    text = "x" * max(0, size - 900)
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"q{i} {text}"}]
        fields = {
            "request_id": f"r{i}",
            "metadata": {"ticket": f"T-{i % 7}"},
            "input": {"model": "m", "temperature": 0.2, "messages": messages},
            **overrides,
        }
        out.append(make_event(**fields))
    return out


# ---------------------------------------------------------------------------------------------
# Settings and topics of a test's own


def isolated_settings(
    bootstrap: str,
    base: Settings | None = None,
    partitions: int = 2,
    data_dir: str | Path | None = None,
    embedded: bool = True,
) -> Settings:
    """``base`` (default: the built-in defaults, no environment) on ``bootstrap`` with topic
    names, the runner's group prefix and the processors' app id unique to this call.

    ``data_dir``: the Faust worker's data directory (give each test its own). ``embedded``:
    short consumer-group sessions, as the embedded broker needs (see ARCHITECTURE.md). The
    topics are not created: ``await create_topics(settings)``.
    """
    suffix = uuid.uuid4().hex[:10]
    base = base if base is not None else load_settings(env={})
    kafka = base.kafka.model_copy(
        update={
            "bootstrap": bootstrap,
            "raw_topic": f"t-{suffix}.raw",
            "events_topic": f"t-{suffix}.events",
            "dlq_topic": f"t-{suffix}.dlq",
            "partitions": partitions,
        }
    )
    proc_update: dict[str, Any] = {"app_id": f"t-{suffix}-processors"}
    if data_dir is not None:
        proc_update["data_dir"] = str(data_dir)
    processors = base.processors.model_copy(update=proc_update)
    runner = base.runner.model_copy(update={"group_prefix": f"t-{suffix}-sink-"})
    s = base.model_copy(update={"kafka": kafka, "processors": processors, "runner": runner})
    return tune_for_embedded_broker(s) if embedded else s


async def create_topics(settings: Settings) -> None:
    """Create the raw, events and DLQ topics of ``settings`` (existing ones are kept)."""
    await ensure_topics(settings.kafka)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``AUDITPIPE_KAFKA_BOOTSTRAP`` when set, else an embedded broker for the session."""
    existing = os.environ.get("AUDITPIPE_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


# ---------------------------------------------------------------------------------------------
# Waiting on conditions


def _polls(timeout_secs: float, what: str) -> Iterator[None]:
    """Yields until the deadline, then raises AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_secs
    while True:
        yield
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_secs}s waiting for {what}")


def wait_until(predicate: Callable[[], Any], timeout_secs: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; raise
    AssertionError naming ``what`` after ``timeout_secs``."""
    for _ in _polls(timeout_secs, what):
        if value := predicate():
            return value
        time.sleep(0.02)


async def wait_for(predicate: Callable[[], Any], timeout_secs: float, what: str) -> Any:
    """:func:`wait_until` for coroutines: the event loop runs while it waits."""
    for _ in _polls(timeout_secs, what):
        if value := predicate():
            return value
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Kafka


async def produce(
    bootstrap: str, topic: str, values: list[bytes], key: bytes | None = None
) -> None:
    """Write ``values`` to ``topic`` in order (acks=all), each acknowledged before the next."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def produce_events(settings: Settings, events: list[Event], topic: str = "") -> None:
    """Encode ``events`` and write them to ``topic`` (default: the events topic)."""
    values = [encode(e) for e in events]
    await produce(settings.kafka.bootstrap or "", topic or settings.kafka.events_topic, values)


def reader(bootstrap: str, topic: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer of ``topic`` from its start, in a group of its own, committing nothing, with
    the short sessions the embedded broker needs; ``options`` override (aiokafka's names)."""
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        **{
            "group_id": f"test-reader-{uuid.uuid4().hex[:8]}",
            "auto_offset_reset": "earliest",
            "enable_auto_commit": False,
            "session_timeout_ms": int(EMBEDDED_SESSION_TIMEOUT_SECS * 1000),  # first join: half
            "heartbeat_interval_ms": int(EMBEDDED_HEARTBEAT_INTERVAL_SECS * 1000),
            **options,
        },
    )


async def consume(
    bootstrap: str, topic: str, count: int, timeout_secs: float = 30.0
) -> list[ConsumerRecord[Any, Any]]:
    """Read at least ``count`` records from the start of ``topic``; AssertionError naming the
    topic and how many arrived after ``timeout_secs``."""
    consumer = reader(bootstrap, topic)
    await consumer.start()
    records: list[ConsumerRecord[Any, Any]] = []
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


async def run_until(
    runner: SinkRunner, done: Callable[[], Any], timeout_secs: float = 60.0, what: str = ""
) -> None:
    """Run ``runner`` until ``done()`` holds, then stop it and wait for it to finish. Raises
    AssertionError (with the runner's counters) after ``timeout_secs``, or the runner's own
    exception if it fails first."""
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


async def committed(settings: Settings, group: str) -> int:
    """Sum of ``group``'s committed offsets over the events topic's partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, group_id=group)
    await consumer.start()
    try:
        total = 0
        for p in range(settings.kafka.partitions):
            total += await consumer.committed(TopicPartition(settings.kafka.events_topic, p)) or 0
        return total
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------------------------
# The sink contract


class SinkContract:
    """The contract every sink passes; subclass it as ``TestSomething`` (see the module
    docstring). The tests:

    - the entry point ``sink_name`` loads the class :meth:`make_sink` builds;
    - its config rejects an unknown key, naming ``sinks.NAME.KEY``;
    - ``stop()`` is safe without ``start()`` and twice;
    - a batch written twice (redelivery) is stored once (set ``idempotent = False`` for a sink
      that cannot promise it, such as stdout: then every event must still be stored);
    - under the runner, N produced events are stored and N offsets committed (needs the
      ``kafka_bootstrap`` fixture).
    """

    #: The sink's entry point name in the ``auditpipe.sinks`` group.
    sink_name: ClassVar[str]
    #: Whether a redelivered batch leaves each event exactly once.
    idempotent: ClassVar[bool] = True
    #: Events in the redelivered batch, and produced for the runner (batches of at most
    #: ``runner_batch_events``): small keeps the contract fast.
    batch_events: ClassVar[int] = 30
    runner_events: ClassVar[int] = 120
    runner_batch_events: ClassVar[int] = 50

    def make_sink(self) -> Sink[Any]:
        """A new, unstarted sink writing to this test's store."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_sink()")

    def stored_ids(self) -> list[str]:
        """Every event id in this test's store, duplicates included."""
        raise NotImplementedError(f"{type(self).__name__} must implement stored_ids()")

    def test_entry_point_loads_the_sink_class(self) -> None:
        """The ``auditpipe.sinks`` entry point ``sink_name`` names the class under test."""
        assert isinstance(self.make_sink(), load_sink_class(self.sink_name))

    def test_config_rejects_an_unknown_key_naming_it(self) -> None:
        """``[sinks.NAME] bogus_key = 1`` is a ConfigError naming sinks.NAME.bogus_key."""
        with pytest.raises(ConfigError, match=rf"sinks\.{self.sink_name}\.bogus_key"):
            load_sink_class(self.sink_name).from_mapping({"bogus_key": 1})

    def test_stop_is_safe_without_start_and_twice(self) -> None:
        """stop() before start() and a second stop() do nothing and raise nothing."""

        async def scenario() -> None:
            sink = self.make_sink()
            await sink.stop()
            await sink.start()
            await sink.stop()
            await sink.stop()

        asyncio.run(scenario())

    def test_a_redelivered_batch_is_stored_once(self) -> None:
        """The same batch (same source offsets) written twice leaves each event once."""
        n = self.batch_events
        events = make_events(n)
        batch = Batch(events, "t", 0, list(range(100, 100 + n)))

        async def scenario() -> None:
            sink = self.make_sink()
            await sink.start()
            try:
                await sink.write(batch)
                await sink.write(batch)
            finally:
                await sink.stop()

        asyncio.run(scenario())
        ids = self.stored_ids()
        assert set(ids) == {e["event_id"] for e in events}
        if self.idempotent:
            assert len(ids) == len(events), "a redelivered batch created duplicates"

    def test_runner_stores_every_event_and_commits(
        self, kafka_bootstrap: str, tmp_path: Path
    ) -> None:
        """Under the runner, N produced events are stored and N offsets committed."""
        events = make_events(self.runner_events)
        base = isolated_settings(kafka_bootstrap, data_dir=tmp_path / "faust")
        runner_settings = base.runner.model_copy(update={"max_events": self.runner_batch_events})
        s = base.model_copy(update={"runner": runner_settings})

        async def scenario() -> int:
            await create_topics(s)
            await produce_events(s, events)
            runner = SinkRunner(self.make_sink(), s)
            await run_until(runner, lambda: runner.stats.written >= len(events))
            return await committed(s, runner.group_id)

        assert asyncio.run(scenario()) == len(events)
        ids = self.stored_ids()
        assert sorted(set(ids)) == sorted(e["event_id"] for e in events)
        if self.idempotent:
            assert len(ids) == len(events)
