"""Mixed schema versions end to end on the embedded broker.

Producers are upgraded at different times and sinks may stay pinned to an old version. Here v1
and v2 producers write to the raw topic, a processor worker (``auditpipe process``, which
decodes any version into the latest and re-encodes it) forwards them, and two sinks read the
events topic: one on the latest version, one pinned to v1 with ``[runner] reader_schema_id``.
Each sink must get every event with the fields its version knows.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from auditpipe.schemas import Event, encode, latest_schema_id, new_event, schema_id_of
from auditpipe.schemas.registry import FileRegistry
from auditpipe.sinks import Sink
from auditpipe.sinks.runner import SinkRunner

from auditpipe.settings import Settings

from .kafkautil import consume, produce
from .workers import spawn_worker, stop

N = 10
V1_FIELDS = frozenset(f["name"] for f in FileRegistry().by_id(1).schema.json["fields"])
V2_ONLY = {
    "tenant": "acme",
    "user": "u-1",
    "tags": {"env": "test"},
    "cost": {"input_usd": 0.25, "output_usd": 0.5, "total_usd": 0.75, "estimated": True},
    "usage_estimated": True,
    "fingerprint": "fp",
    "sample_rate": 0.5,
    "incomplete": True,
    "chunk_count": 3,
}


class LatestSink(Sink):
    name = "latest"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    async def write(self, batch: Sequence[Event]) -> None:
        self.events.extend(batch)


class V1Sink(LatestSink):
    name = "v1-pinned"


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    # no enrich/redact/sample: this test is about versions, so values must pass unchanged
    proc = spawn_worker(settings, tmp_path, steps=[])
    yield proc
    stop(proc)


def v1_event(i: int) -> Event:
    """What a v1 producer emits: only v1 fields (encoded with schema id 1)."""
    e = new_event(request_id=f"v1-{i}", model="m1", metadata={"i": str(i)}, input={"i": i})
    return {k: v for k, v in e.items() if k in V1_FIELDS}


def v2_event(i: int) -> Event:
    return new_event(request_id=f"v2-{i}", model="m2", input={"i": i}, **V2_ONLY)


async def run_sinks(
    runners: list[tuple[SinkRunner, LatestSink]], expected: int, timeout_secs: float
) -> None:
    tasks = [asyncio.create_task(r.run()) for r, _ in runners]
    try:
        deadline = asyncio.get_running_loop().time() + timeout_secs
        while any(len(sink.events) < expected for _, sink in runners):
            for t in tasks:
                if t.done():
                    t.result()  # a runner that died raises here
            if asyncio.get_running_loop().time() > deadline:
                got = {sink.name: len(sink.events) for _, sink in runners}
                raise AssertionError(f"timed out: expected {expected} events per sink, got {got}")
            await asyncio.sleep(0.05)
    finally:
        for r, _ in runners:
            r.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)


class TestMixedVersions:
    def test_v1_and_v2_producers_reach_a_latest_sink_and_a_v1_pinned_sink(
        self, settings: Settings, worker: subprocess.Popen[bytes]
    ) -> None:
        """Every event reaches both sinks, each with the fields its version knows."""
        bootstrap = settings.kafka.bootstrap or ""
        sent_v1 = [v1_event(i) for i in range(N)]
        sent_v2 = [v2_event(i) for i in range(N)]
        raw = [encode(e, schema_id=1) for e in sent_v1] + [encode(e, schema_id=2) for e in sent_v2]
        assert {schema_id_of(v) for v in raw} == {1, 2}

        latest_runner_settings = settings.runner.model_copy(update={"session_timeout_secs": 2})
        pinned_runner_settings = latest_runner_settings.model_copy(update={"reader_schema_id": 1})
        latest, pinned = LatestSink(), V1Sink()
        runners = [
            (SinkRunner(latest, settings.model_copy(update={"runner": latest_runner_settings})),
             latest),
            (SinkRunner(pinned, settings.model_copy(update={"runner": pinned_runner_settings})),
             pinned),
        ]  # fmt: skip

        async def scenario() -> None:
            await produce(bootstrap, settings.kafka.raw_topic, raw)
            await run_sinks(runners, 2 * N, timeout_secs=90)

        asyncio.run(scenario())
        assert worker.poll() is None, "the processor worker died"

        by_id = {e["request_id"]: e for e in latest.events}
        assert sorted(by_id) == sorted(e["request_id"] for e in sent_v1 + sent_v2)
        for sent in sent_v1:  # v1 producer -> latest sink: v1 values, later defaults
            got = by_id[sent["request_id"]]
            assert {k: got[k] for k in sent if k != "processing"} == {
                k: v for k, v in sent.items() if k != "processing"
            }
            assert got["tenant"] is None and got["tags"] == {} and got["cost"] is None
            assert got["incomplete"] is False and got["sample_rate"] is None
            assert got["processing"] == []
        for sent in sent_v2:  # v2 producer -> latest sink: everything v2 has
            got = by_id[sent["request_id"]]
            assert {k: got[k] for k in V2_ONLY} == V2_ONLY

        pinned_by_id = {e["request_id"]: e for e in pinned.events}
        assert sorted(pinned_by_id) == sorted(by_id)
        for sent in sent_v1 + sent_v2:  # any producer -> v1-pinned sink: exactly v1's fields
            got = pinned_by_id[sent["request_id"]]
            assert set(got) == V1_FIELDS
            assert {k: got[k] for k in V1_FIELDS if k != "processing"} == {
                k: sent[k] for k in V1_FIELDS if k != "processing"
            }

        # the processors re-encode everything with the latest version (v3 and later)
        forwarded = asyncio.run(consume(bootstrap, settings.kafka.events_topic, 2 * N))
        assert {schema_id_of(r.value) for r in forwarded} == {latest_schema_id()}
