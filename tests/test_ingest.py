"""`auditpipe ingest`: which lines are records, how they map, and following files across
rotation, truncation and restarts (the CLI as a subprocess; events read from its stdout, and
from Kafka in TestKafka)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditpipe.producer._records import LineFramer, read_line

from auditpipe.dlq import headers_dict
from auditpipe.settings import ProducerSettings, Settings

from .conftest import wait_until
from .kafkautil import consume

CFG = ProducerSettings()
ALLOW = frozenset(CFG.header_allowlist)

SEED = {
    "log_type": "audit", "ts_ms": 1757115457130, "request_id": "req_123",
    "endpoint": "/v1/chat/completions", "model": "meta/llama3-8b-instruct", "store": True,
    "metadata": {"ticket": "SN-1234"},
    "input": {"messages": [{"role": "user", "content": "..."}]},
    "output": {"choices": [{"message": {"role": "assistant", "content": "..."}}]},
    "usage": {"prompt_tokens": 123, "completion_tokens": 456, "total_tokens": 579},
}  # fmt: skip
AUDIT_RECORD = {
    "schema_version": 1, "request_id": "req-ar", "requested_streaming": True, "model": "m",
    "request": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "store": True},
    "response": {"object": "chat.completion", "model": "m",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"}}]},
}  # fmt: skip
OTHER_LINES = [
    b"2025-09-02T15:50:01.770028Z  INFO main.init: VllmWorker for Qwen/Qwen3-0.6B initialized",
    b'{"time":"2025-09-02T16:38:06.656503Z","level":"INFO","target":"dynamo_runtime::logging",'
    b'"message":"SPAN_CREATED","method":"POST","span_id":"6959a1b2d1ee41a5"}',
    b'{"log_type":"access","path":"/v1/models"}',
    b"[1, 2, 3]",
]


def line(value: Any) -> bytes:
    return orjson.dumps(value)


def record(i: int, **extra: Any) -> bytes:
    return line({**SEED, "request_id": f"req-{i}", "ts_ms": SEED["ts_ms"] + i, **extra})


class TestReadLine:
    def test_seed_record_maps_field_by_field(self) -> None:
        """The seed's record: every field lands where the Dynamo format puts it."""
        kind, event, _ = read_line(line(SEED), CFG, ALLOW)
        assert kind == "record"
        for key in ("ts_ms", "request_id", "endpoint", "model", "store", "metadata", "input",
                    "output", "usage"):  # fmt: skip
            assert event[key] == SEED[key], key
        assert event["log_type"] == "audit" and event["stream"] is False

    def test_same_record_same_event_id_other_record_other_id(self) -> None:
        """Ids are derived from the record: reading it again gives the same id."""
        ids = {read_line(record(i), CFG, ALLOW)[1]["event_id"] for i in (1, 1, 2)}
        assert len(ids) == 2
        a = read_line(record(1), CFG, ALLOW)[1]["event_id"]
        prefixed = b"2025-09-02T15:50:01Z stdout F " + record(1)  # behind a container prefix
        assert a == read_line(prefixed, CFG, ALLOW)[1]["event_id"]

    def test_store_false_kept_as_the_server_said(self) -> None:
        kind, event, _ = read_line(line({**SEED, "store": False}), CFG, ALLOW)
        assert kind == "record" and event["store"] is False

    @pytest.mark.parametrize(
        "wrapped",
        [
            b"2025-09-02T15:50:01.770028Z " + line(SEED),  # kubectl logs --timestamps
            b"[frontend-0] " + line(SEED),  # kubectl logs --prefix
            line({"log": line(SEED).decode() + "\n", "stream": "stdout",
                  "time": "2025-09-02T15:50:01.770028Z"}),  # docker json-file
            b"2025-09-02T15:50:01.770028123Z stdout F " + line(SEED),  # CRI (Kubernetes node)
        ],
    )  # fmt: skip
    def test_prefixed_and_container_wrapped_records(self, wrapped: bytes) -> None:
        framer = LineFramer()
        framed = framer.feed(wrapped, 0)
        assert framed is not None
        kind, event, _ = read_line(framed[0], CFG, ALLOW, ts=framed[1])
        assert kind == "record" and event["request_id"] == "req_123"

    def test_cri_partial_lines_are_joined(self) -> None:
        """A long record split in CRI P pieces (interleaved with stderr) becomes one line."""
        text = line(SEED)
        framer = LineFramer()
        assert framer.feed(b"2025-09-02T15:50:01Z stdout P " + text[:50], 0) is None
        assert framer.pending_start() == 0
        other = framer.feed(b"2025-09-02T15:50:01Z stderr F warning", 90)
        assert other == (b"warning", "2025-09-02T15:50:01Z")
        assert framer.feed(b"2025-09-02T15:50:01Z stdout P " + text[50:100], 120) is None
        framed = framer.feed(b"2025-09-02T15:50:02Z stdout F " + text[100:], 200)
        assert framed is not None and framed[0] == text and framer.pending_start() is None

    def test_dynamo_tracing_lines_carry_the_audit_record(self) -> None:
        """Dynamo's stderr sink logs its AuditRecord through tracing: JSONL (record as a
        string) or readable text ending in record={...}; both map, with the log line's time."""
        jsonl = line({"time": "2025-09-02T16:38:06.656503Z", "level": "INFO",
                      "target": "dynamo_llm::audit", "message": "audit", "log_type": "audit",
                      "record": line(AUDIT_RECORD).decode()})  # fmt: skip
        readable = (b"2025-09-02T16:38:06.656503Z  INFO dynamo_llm::audit: audit "
                    b'log_type="audit" record=' + line(AUDIT_RECORD))  # fmt: skip
        for text in (jsonl, readable, line(AUDIT_RECORD)):
            kind, event, _ = read_line(text, CFG, ALLOW)
            assert kind == "record", text
            assert event["request_id"] == "req-ar" and event["model"] == "m"
            assert event["input"] == AUDIT_RECORD["request"]
            assert event["output"] == AUDIT_RECORD["response"] and event["stream"] is True
            assert event["status_code"] == 200 and event["incomplete"] is False
        assert read_line(jsonl, CFG, ALLOW)[1]["ts_ms"] == 1756831086656

    def test_audit_record_without_response_is_incomplete(self) -> None:
        """Dynamo omits the response when the client cancelled or the request timed out."""
        rec = {k: v for k, v in AUDIT_RECORD.items() if k != "response"}
        kind, event, _ = read_line(line(rec), CFG, ALLOW)
        assert kind == "record" and event["incomplete"] is True and event["output"] is None

    def test_streamed_chunks_are_assembled(self) -> None:
        chunks = [{"object": "chat.completion.chunk", "model": "m",
                   "choices": [{"index": 0, "delta": {"content": w}}]}
                  for w in ("a", "b")]  # fmt: skip
        kind, event, _ = read_line(line({**SEED, "output": chunks}), CFG, ALLOW)
        assert kind == "record" and event["stream"] is True
        assert event["output"]["choices"][0]["message"]["content"] == "ab"

    def test_auditpipe_events_keep_their_id(self) -> None:
        """auditpipe's own JSON events (DYN_AUDIT_STDOUT=1 output) pass as they are."""
        _, event, _ = read_line(line(SEED), CFG, ALLOW)
        again = read_line(line({**event, "event_id": "0190a3c3-0000-7000-8000-000000000001"}),
                          CFG, ALLOW)  # fmt: skip
        assert again[0] == "record"
        assert again[1]["event_id"] == "0190a3c3-0000-7000-8000-000000000001"

    def test_credentials_in_recorded_headers_are_dropped(self) -> None:
        rec = {**SEED, "headers": {"Authorization": "Bearer sk-x", "user-agent": "curl"}}
        _, event, _ = read_line(line(rec), CFG, ALLOW)
        assert event["headers"] == {"user-agent": "curl"}

    def test_payload_caps_apply(self) -> None:
        cfg = CFG.model_copy(update={"max_payload_bytes": 1024})
        big = {**SEED, "input": {"messages": [{"role": "user", "content": "x" * 5000}]}}
        _, event, _ = read_line(line(big), cfg, ALLOW)
        assert event["truncated"] is True and event["input"]["_auditpipe_truncated"] is True

    @pytest.mark.parametrize("text", OTHER_LINES)
    def test_other_log_lines_are_not_records(self, text: bytes) -> None:
        assert read_line(text, CFG, ALLOW)[0] == "other"

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            (b'{"log_type":"audit","ts_ms":17571154', "bad_json"),
            (line({**SEED, "ts_ms": "yesterday"}), "invalid"),
            (line({**SEED, "request_id": {"a": 1}}), "invalid"),
            (line({**SEED, "metadata": "x", "usage": [1]}), "invalid"),
            (line({"log_type": "audit", "record": "{not json"}), "bad_json"),
        ],
    )  # fmt: skip
    def test_broken_records_are_malformed_with_a_reason(self, text: bytes, reason: str) -> None:
        kind, got, message = read_line(text, CFG, ALLOW)
        assert (kind, got) == ("malformed", reason) and message


class IngestProcess:
    """``auditpipe ingest`` as a subprocess (stdout transport); events collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 stdin: int | None = None) -> None:  # fmt: skip
        full = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
        full.update({"DYN_AUDIT_STDOUT": "1", "AUDITPIPE_INGEST_POLL_INTERVAL_SECS": "0.05",
                     "AUDITPIPE_INGEST_ROTATE_WAIT_SECS": "0.3", **(env or {})})  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "ingest", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin, env=full,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.events.append(orjson.loads(raw))

    def ids(self) -> list[str]:
        return [e["request_id"] for e in self.events]

    def wait_for(self, *request_ids: str, timeout_secs: float = 15.0) -> None:
        want = set(request_ids)
        wait_until(lambda: want <= set(self.ids()), timeout_secs, f"events {sorted(want)}")

    def stop(self, signal_it: bool = True) -> int:
        """SIGTERM (unless ``signal_it`` is false: a one-shot run ends by itself); exit code."""
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return code


def append(path: Path, *lines: bytes, newline: bool = True) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\n".join(lines) + (b"\n" if newline else b""))


class TestOneShot:
    def test_file_read_once_then_resumed_from_the_state(self, tmp_path: Path) -> None:
        """Records among other lines are published and counted; a second run publishes only
        what was appended since (the state file remembers)."""
        log, state = tmp_path / "dynamo.log", tmp_path / "state.json"
        append(log, OTHER_LINES[0], record(1), OTHER_LINES[1], record(2),
               b'{"log_type":"audit","ts_ms":1')  # fmt: skip
        first = IngestProcess(["--state", str(state), str(log)])
        assert first.stop(signal_it=False) == 3  # a malformed record was skipped
        assert first.ids() == ["req-1", "req-2"]
        assert b"records=2" in first.stderr and b"'bad_json': 1" in first.stderr
        saved = orjson.loads(state.read_bytes())["files"][str(log)]
        assert saved[0]["offset"] == log.stat().st_size
        append(log, record(3))
        second = IngestProcess(["--state", str(state), str(log)])
        assert second.stop(signal_it=False) == 0 and second.ids() == ["req-3"]
        again = IngestProcess(["--no-state", str(log)])  # same lines, same ids: sinks dedupe
        assert again.stop(signal_it=False) == 3
        ids = {e["request_id"]: e["event_id"] for e in first.events + second.events}
        assert {e["request_id"]: e["event_id"] for e in again.events} == ids

    def test_stdin_mixed_stream(self) -> None:
        """`dynamo ... | auditpipe ingest -`: records taken, the rest counted."""
        p = IngestProcess(["-"], stdin=subprocess.PIPE)
        assert p.proc.stdin is not None
        p.proc.stdin.write(b"\n".join([*OTHER_LINES, record(7), record(8)]) + b"\n")
        p.proc.stdin.close()
        assert p.proc.wait(30) == 0
        p.stop()
        assert p.ids() == ["req-7", "req-8"] and b"records=2" in p.stderr

    def test_missing_file_and_bad_settings_are_clear_errors(self, tmp_path: Path) -> None:
        missing = IngestProcess(["--no-state", str(tmp_path / "nope.log")])
        assert missing.stop(signal_it=False) == 1 and b"no such file" in missing.stderr
        bad = IngestProcess(["--no-state", "-"], env={"AUDITPIPE_INGEST_ON_OTHER": "drop"},
                            stdin=subprocess.DEVNULL)  # fmt: skip
        assert bad.stop(signal_it=False) == 2 and b"ingest.on_other" in bad.stderr


class TestFollow:
    def test_rotation_truncation_partial_lines_and_restarts(self, tmp_path: Path) -> None:
        """tail -F across everything a log goes through: the file appears late, a line is
        written in two parts, the file is rotated by rename (a straggler still lands in the
        old one), truncated (copytruncate), rotated again while ingest is down, and ingest is
        restarted twice. Every record comes out exactly once across the runs."""
        log, state = tmp_path / "audit.log", tmp_path / "state.json"
        args = ["--follow", "--state", str(state), str(log)]
        run1 = IngestProcess(args)
        time.sleep(0.2)  # the file does not exist yet
        append(log, OTHER_LINES[0], record(1))
        run1.wait_for("req-1")
        half = record(2)
        append(log, half[:20], newline=False)  # a writer mid-line
        time.sleep(0.2)
        assert "req-2" not in run1.ids()
        with open(log, "ab") as fh:
            fh.write(half[20:] + b"\n")
        run1.wait_for("req-2")
        os.rename(log, tmp_path / "audit.log.1")  # rotation by rename...
        append(tmp_path / "audit.log.1", record(3))  # ...the writer has not reopened yet
        append(log, record(4))
        run1.wait_for("req-3", "req-4")
        assert run1.stop() == 0
        append(log, record(5))  # while ingest is down
        run2 = IngestProcess(args)
        run2.wait_for("req-5")
        os.truncate(log, 0)  # copytruncate
        append(log, record(6))
        run2.wait_for("req-6")
        assert run2.stop() == 0
        append(log, record(7))  # down again: written, then rotated away
        os.rename(log, tmp_path / "audit.log.2")
        append(log, record(8))
        run3 = IngestProcess(args)
        run3.wait_for("req-7", "req-8")
        assert run3.stop() == 0
        ids = run1.ids() + run2.ids() + run3.ids()
        assert sorted(ids) == [f"req-{i}" for i in range(1, 9)], ids
        assert b"'rotations': 1" in run1.stderr and b"'truncations': 1" in run2.stderr
        assert b"'rotations': 1" in run3.stderr  # audit.log.2, found again by its inode

    def test_symlinked_path_rotated_while_down(self, tmp_path: Path) -> None:
        """Kubernetes' layout: the followed path is a symlink into another directory, where the
        kubelet rotates by rename; a rotation while ingest is down is still found."""
        pods = tmp_path / "pods"
        pods.mkdir()
        target, link = pods / "0.log", tmp_path / "frontend.log"
        append(target, record(1))
        link.symlink_to(target)
        args = ["--follow", "--state", str(tmp_path / "state.json"), str(link)]
        run1 = IngestProcess(args)
        run1.wait_for("req-1")
        assert run1.stop() == 0
        append(target, record(2))
        os.rename(target, pods / "0.log.20261203-0101")
        append(target, record(3))
        run2 = IngestProcess(args)
        run2.wait_for("req-2", "req-3")
        assert run2.stop() == 0
        assert run1.ids() + sorted(run2.ids()) == ["req-1", "req-2", "req-3"]

    def test_crash_replays_the_batch_with_the_same_ids(self, tmp_path: Path) -> None:
        """Killed (SIGKILL) after publishing but possibly before saving: the restart re-reads
        at most the unsaved batch, with identical event ids; nothing is missing."""
        log, state = tmp_path / "audit.log", tmp_path / "state.json"
        append(log, *(record(i) for i in range(50)))
        args = ["--follow", "--state", str(state), str(log)]
        run1 = IngestProcess(args)
        run1.wait_for(*(f"req-{i}" for i in range(50)))
        run1.proc.kill()
        run1.stop()
        append(log, record(50))
        run2 = IngestProcess(args)
        run2.wait_for("req-50")
        assert run2.stop() == 0
        first = {e["request_id"]: e["event_id"] for e in run1.events}
        for e in run2.events:
            assert first.get(e["request_id"], e["event_id"]) == e["event_id"]
        assert set(first) | {e["request_id"] for e in run2.events} == {
            f"req-{i}" for i in range(51)}  # fmt: skip


class TestKafka:
    def test_ingest_to_kafka_with_dead_letters(self, settings: Settings, tmp_path: Path) -> None:
        """Records reach the raw topic as Avro events; with on_malformed/on_other = "dlq" the
        broken record and the other line reach the DLQ with their reason and position."""
        from auditpipe.schemas import decode

        log = tmp_path / "dynamo.log"
        bad = b'{"log_type":"audit","ts_ms":1'
        append(log, record(1), OTHER_LINES[2], bad, record(2))
        env = {"DYN_AUDIT_STDOUT": "0", "AUDITPIPE_KAFKA_BOOTSTRAP": settings.kafka.bootstrap or "",
               "AUDITPIPE_KAFKA_RAW_TOPIC": settings.kafka.raw_topic,
               "AUDITPIPE_KAFKA_DLQ_TOPIC": settings.kafka.dlq_topic,
               "AUDITPIPE_INGEST_ON_MALFORMED": "dlq",
               "AUDITPIPE_INGEST_ON_OTHER": "dlq"}  # fmt: skip
        p = IngestProcess(["--no-state", str(log)], env=env)
        assert p.stop(signal_it=False) == 0, p.stderr  # dead-lettered, not skipped
        bootstrap = settings.kafka.bootstrap or ""
        raw = asyncio.run(consume(bootstrap, settings.kafka.raw_topic, 2))
        assert sorted(decode(r.value)["request_id"] for r in raw) == ["req-1", "req-2"]
        dlq = asyncio.run(consume(bootstrap, settings.kafka.dlq_topic, 2))
        by_reason = {headers_dict(r.headers)["auditpipe.dlq.reason"]: r for r in dlq}
        assert set(by_reason) == {"bad_json", "not_audit"}
        broken = by_reason["bad_json"]
        assert broken.value == bad
        h = headers_dict(broken.headers)
        assert h["auditpipe.dlq.stage"] == "ingest" and h["auditpipe.dlq.topic"] == str(log)
        assert int(h["auditpipe.dlq.offset"]) == len(record(1)) + len(OTHER_LINES[2]) + 2
