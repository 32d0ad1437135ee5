"""The schema settings: ``[runner] reader_schema_id`` and the ``[registry]`` table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from auditpipe.schemas import known_schema_ids

from auditpipe.errors import ConfigError
from auditpipe.settings import load_settings


class TestSchemaSettings:
    def test_defaults_read_the_latest_version_with_the_file_registry(self) -> None:
        s = load_settings(env={})
        assert s.runner.reader_schema_id is None
        assert s.registry.url is None and s.registry.compatibility == "FULL_TRANSITIVE"

    def test_reader_schema_id_from_file_and_env(self, tmp_path: Path) -> None:
        path = tmp_path / "a.toml"
        path.write_text("[runner]\nreader_schema_id = 1\n")
        assert load_settings(path, env={}).runner.reader_schema_id == 1
        s = load_settings(env={"AUDITPIPE_RUNNER_READER_SCHEMA_ID": "2"})
        assert s.runner.reader_schema_id == 2

    def test_unknown_reader_schema_id_is_named_with_the_known_ones(self) -> None:
        known = re.escape(str(known_schema_ids()))
        with pytest.raises(ConfigError, match=r"runner\.reader_schema_id: .*unknown schema id 9 "
                           rf"\(known: {known}\)"):  # fmt: skip
            load_settings(env={"AUDITPIPE_RUNNER_READER_SCHEMA_ID": "9"})

    def test_registry_table(self, tmp_path: Path) -> None:
        path = tmp_path / "a.toml"
        path.write_text('[registry]\nurl = "http://sr:8081"\ncompatibility = "BACKWARD"\n')
        s = load_settings(path, env={"AUDITPIPE_REGISTRY_SUBJECT": "audit-value"})
        assert (s.registry.url, s.registry.subject, s.registry.compatibility) == (
            "http://sr:8081",
            "audit-value",
            "BACKWARD",
        )
        path.write_text('[registry]\ncompatibility = "SIDEWAYS"\n')
        with pytest.raises(ConfigError, match=r"registry\.compatibility"):
            load_settings(path, env={})
