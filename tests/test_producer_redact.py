"""[producer] redact = true: the redact step runs in the sender, so the paths that bypass the
processors (the stdout transport, the disk spool) never carry the unredacted content."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from auditpipe.producer import AuditMiddleware, AuditProducer, record
from auditpipe.schemas import new_event

from auditpipe.broker import free_port
from auditpipe.demo import create_demo_app
from auditpipe.errors import ConfigError
from auditpipe.redaction.step import RedactConfig, RedactStep
from auditpipe.settings import Settings, load_settings

from .asgiutil import LineSink, serve
from .conftest import wait_until

CANARY_EMAIL = "canary.7f3a@example.org"
CANARY_KEY = "sk-proj-CanaryCanary0123456789abcdefXYZ"
CANARY_CARD = "4111 1111 1111 1111"
CANARIES = (CANARY_EMAIL, CANARY_KEY, CANARY_CARD, "c00kie-canary")
CONTENT = f"mail {CANARY_EMAIL}, key {CANARY_KEY}, card {CANARY_CARD}."


def settings_from(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "auditpipe.toml"
    path.write_text(toml)
    return load_settings(path, env=env or {})


class TestStdoutTransport:
    def test_canary_through_the_middleware_never_reaches_stdout(self, tmp_path: Path) -> None:
        """A real request through AuditMiddleware with DYN_AUDIT_STDOUT=1 and redact = true:
        the event arrives, redacted by the [pipeline.redact] policy, with its policy version."""
        settings = settings_from(
            tmp_path,
            '[producer]\nredact = true\n[pipeline.redact]\nactions = { EMAIL = "truncate" }\n',
            env={"DYN_AUDIT_STDOUT": "1"},
        )
        assert settings.producer.transport == "stdout"
        sink = LineSink()
        producer = AuditProducer(settings, stream=sink).start()
        try:
            app = AuditMiddleware(create_demo_app(), producer)
            with serve(app) as url:
                body = {
                    "model": "demo-echo-1",
                    "store": True,
                    "metadata": {"cookie": "sid=c00kie-canary"},
                    "messages": [{"role": "user", "content": CONTENT}],
                }
                r = httpx.post(f"{url}/v1/chat/completions", json=body)
                assert r.status_code == 200 and CANARY_KEY in r.text  # the client is untouched
            (event,) = sink.wait_for(1)
        finally:
            producer.stop()
        text = orjson.dumps(event).decode()
        for canary in CANARIES:
            assert canary not in text
        assert "[REDACTED:OPENAI_KEY]" in text and "cana…[TRUNCATED:EMAIL]" in text
        (entry,) = [p for p in event["processing"] if p["step"] == "redact"]
        policy = RedactStep(RedactConfig(actions={"EMAIL": "truncate"})).policy_version
        assert entry["policy_version"] == policy  # the processors' policy, the same version

    def test_a_process_writing_to_its_stdout_leaks_nothing(self) -> None:
        """The environment alone (DYN_AUDIT_STDOUT=1, AUDITPIPE_PRODUCER_REDACT=1) redacts
        what a process prints; without the second variable the canary is printed (control)."""
        code = (
            "from auditpipe.producer import AuditProducer, record\n"
            "p = AuditProducer().start()\n"
            f"record(p, '/v1/chat/completions', {{'messages': [{{'content': {CONTENT!r}}}]}},"
            " {'choices': []})\n"
            "p.stop()\n"
        )
        env = {**os.environ, "DYN_AUDIT_STDOUT": "1", "AUDITPIPE_PRODUCER_REDACT": "1"}
        env.pop("AUDITPIPE_CONFIG", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert b"[REDACTED:OPENAI_KEY]" in out.stdout
        for canary in CANARIES:
            assert canary.encode() not in out.stdout
        env.pop("AUDITPIPE_PRODUCER_REDACT")
        plain = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=60
        )
        assert CANARY_KEY.encode() in plain.stdout

    def test_an_event_redaction_fails_on_is_dropped_and_counted(self, tmp_path: Path) -> None:
        """Fail closed: a record the redact step cannot handle (nested beyond the recursion
        limit) is dropped as redact_failed, never printed; the next one goes through."""
        settings = settings_from(tmp_path, "[producer]\ntransport = 'stdout'\nredact = true\n")
        sink = LineSink()
        producer = AuditProducer(settings, stream=sink).start()
        deep: Any = CONTENT
        for _ in range(sys.getrecursionlimit() + 100):
            deep = [deep]
        try:
            producer.emit(new_event(request_id="deep", input={"nested": deep}))
            producer.emit(new_event(request_id="flat", input={"content": CONTENT}))
            (event,) = sink.wait_for(1)
            assert producer.flush(10)
        finally:
            stats = producer.stop()
        assert event["request_id"] == "flat" and CANARY_KEY not in orjson.dumps(event).decode()
        assert stats["dropped"] == {"redact_failed": 1} and stats["sent"] == 1

    def test_invalid_redact_settings_fail_when_settings_load(self, tmp_path: Path) -> None:
        """[pipeline] is validated by load_settings, before any producer is built."""
        with pytest.raises(ConfigError, match=r"pipeline\.redact\.x"):
            settings_from(
                tmp_path,
                "[producer]\ntransport = 'stdout'\nredact = true\n[pipeline.redact]\nx = 1\n",
            )


class TestSpool:
    @pytest.mark.parametrize("redact", [True, False])
    def test_spool_segments_hold_no_canary(self, tmp_path: Path, redact: bool) -> None:
        """Kafka unreachable: events go to the disk spool, redacted when redact = true (and,
        as a control, with the canary when it is off)."""
        spool = tmp_path / "spool"
        toml = (
            f"[kafka]\nbootstrap = '127.0.0.1:{free_port()}'\n"
            f"[producer]\nredact = {str(redact).lower()}\nspool_dir = '{spool}'\n"
            "stop_timeout_secs = 1.0\nspill_after_ms = 200\n"
        )
        producer = AuditProducer(settings_from(tmp_path, toml)).start()
        try:
            for i in range(20):
                record(producer, "/v1/chat/completions", {"messages": [{"content": CONTENT}]},
                       {"choices": []}, request_id=f"r{i}")  # fmt: skip
            wait_until(lambda: producer.stats()["spooled"] >= 20, 30, "20 events spooled")
        finally:
            stats = producer.stop()
        assert stats["spooled"] == 20 and not stats["dropped"]
        data = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
        assert b"r19" in data  # the events are there
        assert (CANARY_KEY.encode() in data) is not redact
        assert (CANARY_EMAIL.encode() in data) is not redact
