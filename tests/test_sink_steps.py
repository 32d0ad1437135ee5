"""[sinks.NAME] steps: extra steps (a stricter redact policy) before one sink writes, handled
by the sink plumbing (from_mapping builds them, the runner applies them), failing closed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditpipe.schemas import new_event
from auditpipe.sinks import create_sink
from auditpipe.sinks.file import FileSink
from auditpipe.sinks.runner import SinkRunner

from auditpipe.dlq import H_REASON, H_STAGE, headers_dict
from auditpipe.errors import ConfigError
from auditpipe.redaction.step import RedactConfig, RedactStep
from auditpipe.settings import Settings

from .kafkautil import consume
from .sinkutil import committed, fast, produce_events, run_until

STRICT = {"detectors": ["EMAIL", "PHONE"], "actions": {"EMAIL": "hash"}, "hash_key": "viewer"}


class TestConfig:
    def test_steps_and_their_tables_are_taken_out_of_the_sink_table(self, tmp_path: Path) -> None:
        path = str(tmp_path / "out.jsonl")
        sink = create_sink(
            "file", {"file": {"path": path, "gzip": False, "steps": ["redact"], "redact": STRICT}},
            "test.toml",
        )  # fmt: skip
        assert isinstance(sink, FileSink) and sink.config.path == path
        (step,) = sink.steps
        assert isinstance(step, RedactStep)
        assert step.policy_version == RedactStep(RedactConfig(**STRICT)).policy_version

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            (
                {"steps": ["redact"], "redact": {"action": "scramble"}},
                r"sinks\.stdout\.redact\.action",
            ),
            ({"steps": ["redact"], "redact": {"bogus": 1}}, r"sinks\.stdout\.redact\.bogus"),
            ({"steps": ["nope"]}, r"sinks\.stdout\.steps: unknown step 'nope'"),
            ({"steps": "redact"}, r"sinks\.stdout\.steps"),
            ({"redact": {"action": "hash"}}, r"\[sinks\.stdout\.redact\] configures a step"),
            ({"steps": ["redact"], "sample": {}}, r"\[sinks\.stdout\.sample\] configures a step"),
        ],
    )
    def test_bad_step_settings_fail_at_start_up_naming_the_key(
        self, table: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(ConfigError, match=message):
            create_sink("stdout", {"stdout": table}, "test.toml")

    def test_sinks_load_steps_through_the_shared_registry(self) -> None:
        """A sink with a redact step never imports auditpipe.processors (layout rule)."""
        code = (
            "import sys\n"
            "from auditpipe.sinks import create_sink\n"
            "s = create_sink('stdout', {'stdout': {'steps': ['redact']}}, 'x')\n"
            "assert s.steps and 'auditpipe.processors' not in sys.modules, sorted(sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


class TestRunner:
    def test_a_viewer_store_holds_less_than_the_archive_and_failures_fail_closed(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        """The same events into an archive (no steps) and a viewer (a stricter redact policy,
        a sample step and a step that fails on one event): the viewer's file has no email or
        phone, each record says which policy produced it, the failed event is dead-lettered
        and written nowhere by the viewer, the sampled-out one is counted; both commit all."""
        contact = "Write to ann.lee@example.com or call +1 415 555 2671."
        events = [
            new_event(request_id="r0", input={"messages": [{"content": contact}]}),
            new_event(request_id="poison", input={"messages": [{"content": contact}]}),
            new_event(request_id="r2", endpoint="/v1/embeddings", input={"input": "no contact"}),
            new_event(request_id="r3", input={"messages": [{"content": "plain"}]}),
        ]
        viewer_table = {
            "path": str(tmp_path / "viewer.jsonl"), "gzip": False,
            "steps": ["tests.failing_step:FailOn", "redact", "sample"],
            "fail_on": {"request_id": "poison"},
            "redact": STRICT,
            "sample": {"rules": [{"endpoint": "/v1/embeddings", "rate": 0.0}]},
        }  # fmt: skip
        archive_table = {"path": str(tmp_path / "archive.jsonl"), "gzip": False}
        s = fast(settings, max_wait_secs=0.05)

        async def scenario() -> tuple[SinkRunner, SinkRunner, list[Any]]:
            await produce_events(s, events)
            viewer = SinkRunner(FileSink.from_mapping(viewer_table, "test.toml"), s)
            await run_until(viewer, lambda: viewer.stats.received == 4, what="viewer")
            archive_settings = s.model_copy(update={"runner": s.runner.model_copy(
                update={"group_prefix": s.runner.group_prefix + "archive-"})})  # fmt: skip
            archive = SinkRunner(FileSink.from_mapping(archive_table), archive_settings)
            await run_until(archive, lambda: archive.stats.written == 4, what="archive")
            assert await committed(s, viewer.group_id) == 4
            dead = await consume(s.kafka.bootstrap or "", s.kafka.dlq_topic, 1)
            return viewer, archive, dead

        viewer, archive, dead = asyncio.run(scenario())
        assert viewer.stats.written == 2 and viewer.stats.dead_lettered == 1
        assert viewer.stats.dropped == 1 and archive.stats.written == 4
        viewer_text = (tmp_path / "viewer.jsonl").read_text()
        archive_text = (tmp_path / "archive.jsonl").read_text()
        assert "ann.lee@example.com" in archive_text and "555 2671" in archive_text
        assert "ann.lee@example.com" not in viewer_text and "555 2671" not in viewer_text
        assert "poison" not in viewer_text
        written = {r["request_id"]: r for r in map(orjson.loads, viewer_text.splitlines())}
        assert set(written) == {"r0", "r3"}
        (entry,) = [p for p in written["r0"]["processing"] if p["step"] == "redact"]
        assert entry["policy_version"] == RedactStep(RedactConfig(**STRICT)).policy_version
        assert entry["counts"] == {"email": 1, "phone": 1}
        headers = headers_dict(dead[0].headers)
        assert headers[H_STAGE] == "sink:file:step:fail_on"
        assert headers[H_REASON] == "step_failed"
        assert b"poison" in dead[0].value  # the original record, for inspection and replay
