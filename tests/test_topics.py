"""`auditpipe topics`: the pipeline's topics with partitions and retention, created on request.

Against the embedded broker (Tansu), which reports ``retention.ms`` through DescribeConfigs, so
the retention auditpipe asked for at creation is read back from the broker.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import NewTopic

from auditpipe.cli import main
from auditpipe.kafka import admin_client, describe_topics, ensure_topics
from auditpipe.settings import KafkaSettings, load_settings


def config(tmp_path: Path, bootstrap: str, extra: str = "") -> tuple[Path, KafkaSettings]:
    suffix = uuid.uuid4().hex[:8]
    path = tmp_path / "auditpipe.toml"
    path.write_text(
        f"""[kafka]
bootstrap = "{bootstrap}"
raw_topic = "top-{suffix}.raw"
events_topic = "top-{suffix}.events"
dlq_topic = "top-{suffix}.dlq"
partitions = 2
{extra}
"""
    )
    return path, load_settings(path, env={}).kafka


async def retention_of(kafka: KafkaSettings) -> dict[str, tuple[int, int | None]]:
    async with admin_client(kafka) as admin:
        return {t.name: (t.partitions, t.retention_ms) for t in await describe_topics(admin, kafka)}


class TestTopics:
    def test_shows_missing_then_creates_with_partitions_and_retention(
        self, kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Missing topics: exit 1; --create: exit 0, retention.ms from *_retention_secs."""
        path, kafka = config(tmp_path, kafka_bootstrap, "raw_retention_secs = 3600")
        assert main(["topics", "--config", str(path)]) == 1
        out = capsys.readouterr().out
        assert out.count("missing (auditpipe topics --create creates it)") == 3

        assert main(["topics", "--config", str(path), "--create"]) == 0
        out = capsys.readouterr().out
        assert f"{kafka.raw_topic} " in out and "1h" in out and out.count("created") == 3

        got = asyncio.run(retention_of(kafka))
        assert got[kafka.raw_topic] == (2, 3_600_000)
        assert got[kafka.events_topic] == (2, 7 * 86_400_000)
        assert got[kafka.dlq_topic] == (2, 7 * 86_400_000)

        assert main(["topics", "--config", str(path)]) == 0  # now all there, nothing created
        assert "created" not in capsys.readouterr().out

    def test_raw_topic_default_retention_is_three_days(
        self, kafka_bootstrap: str, tmp_path: Path
    ) -> None:
        """ensure_topics (used by dev, broker, tests) creates raw with the short default."""
        _, kafka = config(tmp_path, kafka_bootstrap)
        assert kafka.raw_retention_secs == 3 * 86_400
        asyncio.run(ensure_topics(kafka))
        assert asyncio.run(retention_of(kafka))[kafka.raw_topic] == (2, 3 * 86_400_000)

    def test_lists_other_topics_and_flags_a_retention_that_differs(
        self, kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A topic made elsewhere shows as other; an existing raw topic is left alone."""
        path, kafka = config(tmp_path, kafka_bootstrap, "raw_retention_secs = 60")
        other = f"other-{uuid.uuid4().hex[:8]}"

        async def precreate() -> None:
            async with admin_client(kafka) as admin:
                await admin.create_topics(
                    [
                        NewTopic(other, 1, 1),
                        NewTopic(kafka.raw_topic, 1, 1, topic_configs={"retention.ms": "120000"}),
                    ]
                )

        asyncio.run(precreate())
        assert main(["topics", "--config", str(path), "--create"]) == 0
        lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
        assert " other " in lines[other]
        assert "2m" in lines[kafka.raw_topic]  # not changed to 60 s: existing topics are kept
        assert "retention differs from [kafka] raw_retention_secs" in lines[kafka.raw_topic]
        assert asyncio.run(retention_of(kafka))[kafka.raw_topic] == (1, 120_000)

    def test_no_bootstrap_is_a_config_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without [kafka] bootstrap: exit 2 naming the key."""
        monkeypatch.delenv("AUDITPIPE_KAFKA_BOOTSTRAP", raising=False)
        monkeypatch.delenv("AUDITPIPE_CONFIG", raising=False)
        assert main(["topics"]) == 2
        assert "kafka.bootstrap is not set" in capsys.readouterr().err

    def test_unreachable_broker_exits_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing listening: exit 1 with the address, no traceback."""
        from auditpipe.broker import free_port

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AUDITPIPE_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
            mp.setenv("AUDITPIPE_KAFKA_REQUEST_TIMEOUT_MS", "1000")
            assert main(["topics"]) == 1
        assert "did not answer" in capsys.readouterr().err
