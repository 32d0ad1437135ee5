"""docs/configuration.md is generated from the config models and must not go stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydantic import Field

from auditpipe import configdoc
from auditpipe.settings import KafkaSettings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "auditpipe.configdoc", "--check", str(DOC)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_every_settings_table_and_sink_is_documented() -> None:
    text = DOC.read_text("utf-8")
    from auditpipe.settings import Settings

    for name, field in Settings.model_fields.items():
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            assert f"## `[{name}]`" in text, name
    for sink in ("file", "s3", "mongodb", "postgres", "stdout"):
        assert f"## `[sinks.{sink}]`" in text, sink


def test_a_changed_description_makes_the_reference_stale(tmp_path: Path, monkeypatch) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(configdoc.render(), "utf-8")
    assert configdoc.main(["--check", str(stale)]) == 0
    field = KafkaSettings.model_fields["bootstrap"]
    monkeypatch.setitem(
        KafkaSettings.model_fields, "bootstrap",
        Field(field.default, description="a description nobody has written down"),
    )  # fmt: skip
    assert "a description nobody has written down" in configdoc.render()
    assert configdoc.main(["--check", str(stale)]) == 1
