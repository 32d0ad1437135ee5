"""End to end: `auditpipe dev` drives the openai client through hook, Kafka, Faust and a sink."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import orjson

from auditpipe.demo import reply_for


def run_dev(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "auditpipe", "dev", *args],
        capture_output=True,
        timeout=timeout,
        env=env,
        check=False,
    )


class TestDev:
    def test_n_requests_give_exactly_n_complete_events_at_the_stdout_sink(self) -> None:
        """20 openai-client calls with store=True -> 20 JSON lines, one per request, complete."""
        n = 20
        result = run_dev("--requests", str(n))
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 0, stderr
        events = [orjson.loads(line) for line in result.stdout.splitlines()]
        assert len(events) == n, stderr
        ids = sorted(e["request_id"] for e in events)
        assert len(set(ids)) == n
        assert all(re.fullmatch(r"dev-[0-9a-f]{8}-\d{6}", i) for i in ids)
        for event in events:
            seq = int(event["request_id"].rsplit("-", 1)[1])
            messages = event["input"]["messages"]
            assert event["model"] == "demo-echo-1" and event["store"] is True
            assert event["endpoint"] == "/v1/chat/completions" and event["status_code"] == 200
            assert messages[-1] == {
                "role": "user",
                "content": f"Hello number {seq}, what is {seq} + {seq}?",
            }
            assert (
                event["metadata"]["seq"] == str(seq)
                and event["metadata"]["source"] == "auditpipe-dev"
            )
            content = event["output"]["choices"][0]["message"]["content"]
            assert content == reply_for("demo-echo-1", messages)
            assert event["usage"] == event["output"]["usage"] and event["usage"]["total_tokens"] > 0
            assert event["headers"]["x-request-id"] == event["request_id"]
            assert "authorization" not in event["headers"]
            assert [p["step"] for p in event["processing"]] == ["enrich", "redact", "sample"]
            assert event["cost"]["total_usd"] > 0 and event["fingerprint"]
        assert re.search(rf"summary: sent={n} captured={n} produced={n} delivered={n}", stderr)

    def test_unknown_sink_is_a_configuration_error(self) -> None:
        result = run_dev("--sink", "nosuch", "--requests", "1", timeout=60)
        assert result.returncode == 2
        assert b"unknown sink 'nosuch'" in result.stderr and b"stdout" in result.stderr
