"""The Faust processor worker as users run it (`auditpipe process`), on the real broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from auditpipe.schemas import decode, encode, new_event

from auditpipe.broker import EmbeddedBroker
from auditpipe.dlq import H_REASON, H_STAGE, headers_dict
from auditpipe.kafka import ensure_topics
from auditpipe.settings import Settings
from auditpipe.tcpproxy import TcpProxy

from .conftest import wait_until
from .kafkautil import consume, produce, run
from .workers import spawn_worker, stop


@pytest.fixture(params=[0, 1], ids=["steps-in-worker", "one-step-process"])
def worker(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    proc = spawn_worker(with_step_processes(settings, request.param), tmp_path)
    yield proc
    stop(proc)


def with_step_processes(settings: Settings, n: int) -> Settings:
    return settings.model_copy(
        update={"processors": settings.processors.model_copy(update={"step_processes": n})}
    )


class TestProcessorWorker:
    def test_garbage_goes_to_dlq_and_good_events_around_it_are_delivered(
        self, settings: Settings, worker: subprocess.Popen[bytes]
    ) -> None:
        """Interleaved malformed records end in the DLQ with the reason; the worker lives on
        (decode failures happen in the step process when there is one)."""
        good = [new_event(request_id=f"g{i}", model="m") for i in range(30)]
        garbage = [b"", b"{json: no}", b"\x00\x00\x00\x00\x01\xff\xff"]
        values: list[bytes] = []
        for i, event in enumerate(good):
            values.append(encode(event))
            if i % 10 == 5:
                values.append(garbage[i // 10])
        bootstrap = settings.kafka.bootstrap or ""
        run(produce(bootstrap, settings.kafka.raw_topic, values))

        delivered = run(consume(bootstrap, settings.kafka.events_topic, 30, timeout_secs=90))
        decoded = [decode(r.value) for r in delivered]
        assert sorted(e["request_id"] for e in decoded) == sorted(e["request_id"] for e in good)
        assert all(
            [p["step"] for p in e["processing"]] == ["enrich", "redact", "sample"] for e in decoded
        )

        dead = run(consume(bootstrap, settings.kafka.dlq_topic, 3))
        assert sorted(r.value for r in dead) == sorted(garbage)
        reasons = {headers_dict(r.headers)[H_REASON] for r in dead}
        assert reasons == {"truncated", "bad_magic", "bad_body"}
        assert all(headers_dict(r.headers)[H_STAGE] == "decode" for r in dead)
        assert worker.poll() is None, "the worker died on bad input"

    def test_sigterm_stops_the_worker(self, worker: subprocess.Popen[bytes]) -> None:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) in (0, -signal.SIGTERM)


class TestWorkerKilled:
    @pytest.mark.parametrize("step_processes", [0, 1])
    def test_kill_9_mid_stream_then_restart_delivers_every_event(
        self, settings: Settings, tmp_path: Path, step_processes: int
    ) -> None:
        """SIGKILL a worker while it forwards a stream; a new one delivers the rest.

        Duplicates are allowed (at-least-once) and counted; missing events are not. With step
        processes, the killed worker's step process must die with it.
        """
        settings = with_step_processes(settings, step_processes)
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        n = 3000
        bootstrap = settings.kafka.bootstrap or ""
        first = spawn_worker(settings, tmp_path, "first")
        second: subprocess.Popen[bytes] | None = None
        orphans: list[int] = []

        async def scenario() -> tuple[dict[str, int], int]:
            nonlocal second
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
            consumer = AIOKafkaConsumer(
                settings.kafka.events_topic,
                bootstrap_servers=bootstrap,
                group_id=f"reader-{settings.kafka.events_topic}",
                auto_offset_reset="earliest",
                session_timeout_ms=3000,
                heartbeat_interval_ms=500,
            )
            await producer.start()
            await consumer.start()
            seen: dict[str, int] = {}
            sent = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            try:
                while len(seen) < n:
                    assert loop.time() < deadline, f"only {len(seen)}/{n} delivered"
                    if sent < n:  # a steady stream, 100 events per round
                        for i in range(sent, min(n, sent + 100)):
                            await producer.send(
                                settings.kafka.raw_topic, encode(new_event(request_id=f"k{i}"))
                            )
                        sent = min(n, sent + 100)
                    batch = await consumer.getmany(timeout_ms=100)
                    for msgs in batch.values():
                        for m in msgs:
                            rid = decode(m.value)["request_id"]
                            seen[rid] = seen.get(rid, 0) + 1
                    if second is None and len(seen) >= n // 4:
                        orphans.extend(child_pids(first.pid))
                        first.kill()  # SIGKILL: no flush, no commit, no LeaveGroup
                        first.wait()
                        second = spawn_worker(settings, tmp_path, "second")
            finally:
                await producer.stop()
                await consumer.stop()
            return seen, sent

        try:
            seen, _ = run(scenario())
        finally:
            stop(first)
            if second is not None:
                stop(second)
        duplicates = sum(seen.values()) - len(seen)
        print(f"kill -9 test: {len(seen)} delivered, {duplicates} duplicate(s)")
        assert second is not None, "the first worker was never killed"
        assert first.returncode == -signal.SIGKILL
        assert set(seen) == {f"k{i}" for i in range(n)}
        assert len(orphans) >= step_processes, orphans  # (spawn adds a resource tracker)
        wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in orphans), 10,
                   "the killed worker's step processes to exit")  # fmt: skip


class TestGroupSignal:
    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
    def test_a_signal_to_the_whole_group_stops_the_worker_cleanly_mid_stream(
        self, settings: Settings, tmp_path: Path, sig: signal.Signals
    ) -> None:
        """Ctrl-C in a terminal or systemd's stop reach the step process too: it ignores them,
        the worker stops in order (not exit code 70), the step process ends with it, and a
        restarted worker delivers every event."""
        import os

        s = with_step_processes(settings, 1)
        bootstrap = s.kafka.bootstrap or ""
        n = 3000
        run(produce_many(bootstrap, s.kafka.raw_topic, [
            encode(new_event(request_id=f"g{i}")) for i in range(n)
        ]))  # fmt: skip
        first = spawn_worker(s, tmp_path, "first", own_group=True)
        second: subprocess.Popen[bytes] | None = None
        try:
            run(consume(bootstrap, s.kafka.events_topic, 1, timeout_secs=60))  # mid-stream now
            children = child_pids(first.pid)
            assert children, "no step process"
            os.killpg(first.pid, sig)
            assert first.wait(30) in (0, -sig), (tmp_path / "first.log").read_text()
            wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in children), 10,
                       "the step process to end with the worker")  # fmt: skip
            second = spawn_worker(s, tmp_path, "second")
            records = run(consume(bootstrap, s.kafka.events_topic, n, timeout_secs=120))
            assert {decode(r.value)["request_id"] for r in records} == {f"g{i}" for i in range(n)}
        finally:
            stop(first)
            if second is not None:
                stop(second)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), e.g. a worker's step processes."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


class TestWorkerMetrics:
    def test_counts_per_model_and_tenant_are_served_as_prometheus_metrics(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        """The counts table and the outcome counters appear on the worker's /metrics pages
        (Faust's web server on processors.web_port and [metrics] port), in auditpipe's
        vocabulary; its log (Faust's lines included) is JSON lines with [logging] format."""
        import urllib.request

        from auditpipe.broker import free_port

        from .conftest import wait_until

        port, metrics_port = free_port(), free_port()
        settings = settings.model_copy(
            update={
                "processors": settings.processors.model_copy(update={"web_port": port}),
                "metrics": settings.metrics.model_copy(update={"port": metrics_port}),
                "logging": settings.logging.model_copy(update={"format": "json", "level": "info"}),
            }
        )
        values = [encode(new_event(model="m-a", metadata={"tenant": "acme"})) for _ in range(7)]
        values += [encode(new_event(model="m-b")) for _ in range(5)] + [b"garbage"]
        run(produce(settings.kafka.bootstrap or "", settings.kafka.raw_topic, values))
        proc = spawn_worker(settings, tmp_path)
        try:

            def page(port: int) -> str:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        return str(r.read().decode())
                except OSError:
                    return ""

            s = 'stage="processor"'
            expected = [
                f'auditpipe_events_by_dimension_total{{dimension="model",{s},value="m-a"}} 7.0',
                f'auditpipe_events_by_dimension_total{{dimension="model",{s},value="m-b"}} 5.0',
                f'auditpipe_events_by_dimension_total{{dimension="tenant",{s},value="acme"}} 7.0',
                f"auditpipe_events_received_total{{{s}}} 13.0",
                f"auditpipe_events_sent_total{{{s}}} 12.0",
                f'auditpipe_events_dead_lettered_total{{reason="bad_magic",{s}}} 1.0',
                f'auditpipe_latency_seconds_count{{op="process",{s}}}',
                f'auditpipe_lag{{partition="{settings.kafka.raw_topic}[',
            ]
            for p in (port, metrics_port):
                text = wait_until(
                    lambda p=p: (lambda t: t if all(e in t for e in expected) else "")(page(p)),
                    60,
                    f"the counts on :{p}/metrics",
                )
                assert "# TYPE auditpipe_events_by_dimension_total counter" in text

            def caught_up() -> bool:
                lags = [
                    ln for ln in page(metrics_port).splitlines() if ln.startswith("auditpipe_lag{")
                ]
                return bool(lags) and all(ln.endswith(" 0.0") for ln in lags)

            wait_until(caught_up, 60, "the raw topic's lag to reach 0 once committed")
        finally:
            stop(proc)
        lines = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
        assert lines, "the worker logged nothing"
        for line in lines:
            assert {"time", "level", "logger", "message", "pid"} <= set(line), line
            assert line["pid"] == proc.pid and line["time"].endswith("Z")
        loggers = {line["logger"] for line in lines}
        assert any(name.startswith(("faust", "mode")) for name in loggers), loggers  # Faust's own


class TestDeadAgent:
    @pytest.mark.parametrize("step_processes", [0, 1])
    def test_an_agent_that_dies_takes_the_worker_down_and_loses_nothing(
        self, settings: Settings, tmp_path: Path, step_processes: int
    ) -> None:
        """An error escaping the steps (in the worker or in a step process) exits the worker
        (code 70) without acking the batch; a healthy worker afterwards delivers the events."""
        settings = with_step_processes(settings, step_processes)
        bootstrap = settings.kafka.bootstrap or ""
        values = [encode(new_event(request_id=f"d{i}")) for i in range(20)]
        run(produce(bootstrap, settings.kafka.raw_topic, values))
        doomed = spawn_worker(settings, tmp_path, "doomed", steps=["tests.crash_step:CrashStep"])
        try:
            assert doomed.wait(60) == 70
        finally:
            stop(doomed)
        healthy = spawn_worker(settings, tmp_path, "healthy", steps=[])
        try:
            records = run(consume(bootstrap, settings.kafka.events_topic, 20, timeout_secs=60))
        finally:
            stop(healthy)
        assert {decode(r.value)["request_id"] for r in records} == {f"d{i}" for i in range(20)}


class TestBrokerOutage:
    def test_broker_unreachable_mid_stream_then_back_loses_nothing(
        self,
        settings: Settings,
        tmp_path: Path,
        proxied_broker: tuple[EmbeddedBroker, TcpProxy],
    ) -> None:
        """The broker vanishes (every connection cut) while the worker forwards a stream, and
        comes back 8 s later: every event arrives on the events topic. Records whose delivery
        failed were not acked, so nothing was committed past them; the worker either rides the
        outage out or exits for its supervisor, and a restarted one finishes the stream."""
        _, proxy = proxied_broker
        bootstrap = f"127.0.0.1:{proxy.port}"
        s = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap": bootstrap})}
        )
        run(ensure_topics(s.kafka))
        n = 4000
        run(produce_many(bootstrap, s.kafka.raw_topic, [
            encode(new_event(request_id=f"o{i}")) for i in range(n)
        ]))  # fmt: skip
        worker = spawn_worker(s, tmp_path, "first")
        restarted: subprocess.Popen[bytes] | None = None
        try:
            run(consume(bootstrap, s.kafka.events_topic, 1, timeout_secs=60))  # mid-stream now
            proxy.cut()
            outage_ends = time.monotonic() + 8.0  # the fault's length, not a wait for a result
            while time.monotonic() < outage_ends:
                time.sleep(0.2)
            proxy.restore()
            if worker.poll() is not None:  # it gave up during the outage: restart it
                restarted = spawn_worker(s, tmp_path, "second")
            records = run(consume(bootstrap, s.kafka.events_topic, n, timeout_secs=120))
            ids = [decode(r.value)["request_id"] for r in records]
            print(
                f"outage test: {len(set(ids))} delivered, {len(ids) - len(set(ids))} duplicate(s),"
                f" worker {'restarted' if restarted else 'survived'}"
            )
            assert set(ids) == {f"o{i}" for i in range(n)}
        finally:
            stop(worker)
            if restarted is not None:
                stop(restarted)


async def produce_many(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, v) for v in values])
    finally:
        await producer.stop()


class TestPermanentKafkaRejection:
    def test_a_record_kafka_will_never_take_is_dead_lettered_and_the_worker_goes_on(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        """An event a step makes larger than Kafka's request limit used to be retried forever,
        stalling its partition; now it goes to the DLQ (original bytes, reason kafka_rejected)
        and the events around it are delivered."""
        proc = spawn_worker(settings, tmp_path, steps=["tests.inflating_step:Inflate"])
        try:
            events = [new_event(request_id=f"ok-{i}", model="m") for i in range(20)]
            big = new_event(request_id="inflate-1", model="m")
            values = [encode(e) for e in events[:10]] + [encode(big)]
            values += [encode(e) for e in events[10:]]
            bootstrap = settings.kafka.bootstrap or ""
            run(produce(bootstrap, settings.kafka.raw_topic, values))

            delivered = run(consume(bootstrap, settings.kafka.events_topic, 20, timeout_secs=90))
            assert sorted(decode(r.value)["request_id"] for r in delivered) == sorted(
                e["request_id"] for e in events
            )
            dead = run(consume(bootstrap, settings.kafka.dlq_topic, 1, timeout_secs=60))
            assert [r.value for r in dead] == [encode(big)]
            headers = headers_dict(dead[0].headers)
            assert headers[H_REASON] == "kafka_rejected"
            assert headers[H_STAGE] == "deliver"
            assert proc.poll() is None, "the worker died on a rejected record"
        finally:
            stop(proc)
