"""The Faust processor worker as users run it (`auditpipe process`), on the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from auditpipe.schemas import decode, encode, new_event

from auditpipe.dlq import H_REASON, H_STAGE, headers_dict
from auditpipe.settings import Settings

from .kafkautil import consume, produce, run


def write_config(settings: Settings, path: Path) -> Path:
    k, p = settings.kafka, settings.processors
    path.write_text(
        f'[kafka]\nbootstrap = "{k.bootstrap}"\nraw_topic = "{k.raw_topic}"\n'
        f'events_topic = "{k.events_topic}"\ndlq_topic = "{k.dlq_topic}"\n'
        f"partitions = {k.partitions}\n"
        f'[processors]\napp_id = "{p.app_id}"\ndata_dir = "{p.data_dir}"\n'
        f"session_timeout_secs = {p.session_timeout_secs}\n"
        f"heartbeat_interval_secs = {p.heartbeat_interval_secs}\n"
    )
    return path


@pytest.fixture
def worker(settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    config = write_config(settings, tmp_path / "auditpipe.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "auditpipe", "process", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "wb"),
    )
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class TestProcessorWorker:
    def test_garbage_goes_to_dlq_and_good_events_around_it_are_delivered(
        self, settings: Settings, worker: subprocess.Popen[bytes]
    ) -> None:
        """Interleaved malformed records end in the DLQ with the reason; the worker lives on."""
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
