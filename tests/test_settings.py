"""Settings: TOML file plus AUDITPIPE_<TABLE>_<KEY> overrides; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from auditpipe.sinks import create_sink

from auditpipe.errors import ConfigError
from auditpipe.settings import load_settings


class TestLoadSettings:
    def test_defaults_work_without_a_file(self) -> None:
        s = load_settings(env={})
        assert s.kafka.raw_topic == "auditpipe.raw" and s.kafka.bootstrap is None

    def test_env_overrides_the_file(self, tmp_path: Path) -> None:
        """AUDITPIPE_KAFKA_BOOTSTRAP wins over [kafka] bootstrap."""
        path = tmp_path / "a.toml"
        path.write_text('[kafka]\nbootstrap = "file:9092"\npartitions = 6\n')
        s = load_settings(path, env={"AUDITPIPE_KAFKA_BOOTSTRAP": "env:9092"})
        assert s.kafka.bootstrap == "env:9092" and s.kafka.partitions == 6

    def test_unknown_key_is_named_with_the_allowed_ones(self, tmp_path: Path) -> None:
        path = tmp_path / "a.toml"
        path.write_text('[kafka]\nbootstrp = "x"\n')
        with pytest.raises(ConfigError) as info:
            load_settings(path, env={})
        message = str(info.value)
        assert "kafka.bootstrp: unknown key" in message and "bootstrap" in message
        assert str(path) in message

    def test_bad_value_is_named(self) -> None:
        with pytest.raises(ConfigError, match=r"kafka\.partitions"):
            load_settings(env={"AUDITPIPE_KAFKA_PARTITIONS": "many"})

    def test_unreadable_toml(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text("[kafka\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_settings(path, env={})

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="no such settings file"):
            load_settings(tmp_path / "nope.toml", env={})


class TestSinkConfig:
    def test_unknown_sink_lists_installed_ones(self) -> None:
        with pytest.raises(ConfigError, match=r"installed sinks: .*stdout"):
            create_sink("nosuch", {}, "settings")

    def test_sink_config_rejects_unknown_keys(self) -> None:
        with pytest.raises(ConfigError, match=r"sinks\.stdout\.colour: unknown key"):
            create_sink("stdout", {"stdout": {"colour": "red"}}, "settings")
