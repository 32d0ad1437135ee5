"""`auditpipe schemas check` and `auditpipe schemas compat`: published versions stay compatible."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from auditpipe.schemas.registry import FileRegistry, package_dir

from auditpipe.cli import main

SCHEMAS = package_dir()
V1 = SCHEMAS / "audit_event.v1.avsc"
V2 = SCHEMAS / "audit_event.v2.avsc"


def narrowed_total_tokens(tmp_path: Path, version: int = 3) -> Path:
    """A copy of v2 whose usage.total_tokens is an int: v1 and v2 data cannot be read by it."""
    schema = json.loads(V2.read_text())
    for fld in schema["fields"]:
        if fld["name"] == "usage":
            for sub in fld["type"][1]["fields"]:
                if sub["name"] == "total_tokens":
                    sub["type"] = "int"
                    sub.pop("default")
    path = tmp_path / f"audit_event.v{version}.avsc"
    path.write_text(json.dumps(schema))
    return path


class TestSchemasCheck:
    def test_every_published_version_is_full_transitive_compatible(self) -> None:
        """The real command over the installed schemas/ exits 0: this guards every change."""
        result = subprocess.run(
            [sys.executable, "-m", "auditpipe", "schemas", "check"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert b"FULL_TRANSITIVE compatible" in result.stderr

    def test_registry_lists_every_avsc_file(self) -> None:
        """No .avsc file in schemas/ escapes the check by missing from registry.json."""
        listed = {v.file for v in FileRegistry().versions}
        assert listed == {p.name for p in SCHEMAS.glob("*.avsc")}

    def test_an_incompatible_new_version_fails_the_check(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Adding an incompatible version to a copy of schemas/ makes the check exit 1 with
        paths."""
        for p in (*SCHEMAS.glob("*.avsc"), SCHEMAS / "registry.json"):
            shutil.copy(p, tmp_path / p.name)
        manifest = json.loads((tmp_path / "registry.json").read_text())
        new = max(v["version"] for v in manifest["versions"]) + 1
        narrowed = narrowed_total_tokens(tmp_path, new)
        manifest["versions"].append({"version": new, "id": new, "file": narrowed.name})
        (tmp_path / "registry.json").write_text(json.dumps(manifest))
        assert main(["schemas", "check", "--dir", str(tmp_path)]) == 1
        out = capsys.readouterr().out
        assert "AuditEvent.usage.total_tokens: type long cannot be read as int" in out
        assert "AuditEvent.usage.total_tokens: type null cannot be read as int" in out

    @pytest.mark.parametrize(
        ("manifest", "fragment"),
        [
            ("{", "registry.json: not JSON"),
            ('{"versions": [{"version": 1, "id": 1}]}', "versions[0]: missing 'file'"),
            ('{"versions": [{"version": 1, "id": 1, "file": "nope.avsc"}]}', "nope.avsc"),
        ],
    )
    def test_a_broken_registry_exits_2_with_the_reason(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: str, fragment: str
    ) -> None:
        (tmp_path / "registry.json").write_text(manifest)
        assert main(["schemas", "check", "--dir", str(tmp_path)]) == 2
        assert fragment in capsys.readouterr().err


class TestSchemasCompat:
    def run(self, capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
        code = main(["schemas", "compat", *map(str, args)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    def test_v1_to_v2_is_compatible_in_every_mode(self, capsys: pytest.CaptureFixture[str]) -> None:
        for mode in ("backward", "forward", "full", "full_transitive"):
            code, out, err = self.run(capsys, V1, V2, "--mode", mode)
            assert code == 0 and out == "", err
            assert f"is {mode.upper()} compatible" in err

    def test_incompatible_prints_each_problem_with_its_path(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        new = narrowed_total_tokens(tmp_path)
        code, out, err = self.run(capsys, V2, new, "--mode", "backward")
        assert code == 1
        lines = out.splitlines()
        assert lines == [
            f"AuditEvent.usage.total_tokens: type null cannot be read as int (reader {new}, "
            f"writer {V2})",
            f"AuditEvent.usage.total_tokens: type long cannot be read as int (reader {new}, "
            f"writer {V2})",
        ]
        assert "NOT BACKWARD compatible" in err
        code, out, _ = self.run(capsys, V2, new, "--mode", "forward")
        assert code == 0 and out == ""  # an int is promoted to the old reader's long

    def test_transitive_mode_takes_several_previous_versions(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        new = narrowed_total_tokens(tmp_path)
        code, out, _ = self.run(capsys, V1, V2, new, "--mode", "backward_transitive")
        assert code == 1 and f"writer {V1}" in out and f"writer {V2}" in out

    @pytest.mark.parametrize(
        ("content", "fragment"),
        [
            (None, "cannot read"),
            ("{oops", "not JSON"),
            (
                '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "Nope"}]}',
                "R.a: unknown type 'Nope'",
            ),
        ],
    )
    def test_unreadable_or_invalid_schema_exits_2(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        content: str | None,
        fragment: str,
    ) -> None:
        path = tmp_path / "new.avsc"
        if content is not None:
            path.write_text(content)
        code, _, err = self.run(capsys, V1, path)
        assert code == 2
        assert str(path) in err and fragment in err

    def test_one_file_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert self.run(capsys, V1)[0] == 2
