"""[producer] settings: new keys, environment overrides, compatibility switches, clear errors."""

from __future__ import annotations

import pytest

from auditpipe.errors import ConfigError
from auditpipe.settings import load_settings


class TestProducerSettings:
    def test_defaults(self) -> None:
        """Spool by default, store gating, the OpenAI and OIP v2 paths, credentials not allowed."""
        p = load_settings(env={}).producer
        assert p.when_full == "spool" and p.capture == "store" and p.transport == "kafka"
        assert "/v2/models/{name}/versions/{version}/infer" in p.capture_paths
        assert "authorization" not in p.header_allowlist and p.enabled is True

    def test_environment_overrides_including_lists(self) -> None:
        """AUDITPIPE_PRODUCER_<KEY> works for every key; lists are comma separated."""
        env = {
            "AUDITPIPE_PRODUCER_WHEN_FULL": "block",
            "AUDITPIPE_PRODUCER_BLOCK_TIMEOUT_MS": "3",
            "AUDITPIPE_PRODUCER_CAPTURE_PATHS": "/a/{name}/run, /b",
            "AUDITPIPE_PRODUCER_HEADER_ALLOWLIST": "user-agent,x-tenant",
            "AUDITPIPE_PRODUCER_SPOOL_DIR": "/var/spool/x",
        }
        p = load_settings(env=env).producer
        assert p.when_full == "block" and p.block_timeout_ms == 3
        assert p.capture_paths == ["/a/{name}/run", "/b"]
        assert p.header_allowlist == ["user-agent", "x-tenant"]
        assert p.spool_dir == "/var/spool/x"

    def test_compatibility_switches(self) -> None:
        """AUDITPIPE_ENABLED and DYN_AUDIT_STDOUT; explicit producer keys win over them."""
        assert load_settings(env={"AUDITPIPE_ENABLED": "0"}).producer.enabled is False
        env = {"AUDITPIPE_ENABLED": "0", "AUDITPIPE_PRODUCER_ENABLED": "1"}
        assert load_settings(env=env).producer.enabled is True
        assert load_settings(env={"DYN_AUDIT_STDOUT": "1"}).producer.transport == "stdout"
        assert load_settings(env={"DYN_AUDIT_STDOUT": "0"}).producer.transport == "kafka"

    @pytest.mark.parametrize(
        ("env", "needle"),
        [
            ({"AUDITPIPE_PRODUCER_WHEN_FULL": "wait"}, "producer.when_full"),
            ({"AUDITPIPE_PRODUCER_SPOOL_MAX_BYTES": "10"}, "producer.spool_max_bytes"),
            ({"AUDITPIPE_PRODUCER_CAPTURE_PATHS": "v1/chat"}, "producer.capture_paths"),
            (
                {"AUDITPIPE_PRODUCER_SPOOL_MAX_MB": "1"},
                "did you mean AUDITPIPE_PRODUCER_SPOOL_MAX_BYTES",
            ),
        ],
    )
    def test_errors_name_the_key(self, env: dict[str, str], needle: str) -> None:
        """Invalid values and unknown keys are rejected naming the key."""
        with pytest.raises(ConfigError, match=needle):
            load_settings(env=env)


def test_middleware_arguments_are_validated_like_settings() -> None:
    """AuditMiddleware(capture=...) with a bad value raises ConfigError naming the key."""
    from auditpipe.producer import AuditMiddleware, AuditProducer

    settings = load_settings(env={"AUDITPIPE_PRODUCER_TRANSPORT": "stdout"})
    with pytest.raises(ConfigError, match=r"producer\.capture"):
        AuditMiddleware(lambda *a: None, AuditProducer(settings), capture="some")  # type: ignore[arg-type]
