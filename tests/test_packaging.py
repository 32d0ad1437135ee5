"""Packaging: the folder-to-namespace mapping, the wheel's contents, the light producer."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("faust", "boto3", "pymongo", "psycopg", "mode", "starlette", "httpx", "uvicorn", "aiohttp")


def test_importing_the_producer_imports_no_heavy_dependency() -> None:
    """`import auditpipe.producer` pulls no faust, boto3, pymongo, psycopg, nor the doors' aiohttp,
    httpx, uvicorn and starlette."""
    code = (
        "import sys, auditpipe.producer\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(','.join(sorted(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout}"


def test_subpackages_map_to_the_top_level_folders() -> None:
    import auditpipe.api
    import auditpipe.processors
    import auditpipe.producer
    import auditpipe.schemas
    import auditpipe.sinks

    for module, folder in [
        (auditpipe.producer, "producer"),
        (auditpipe.processors, "processors"),
        (auditpipe.sinks, "sinks"),
        (auditpipe.schemas, "schemas"),
        (auditpipe.api, "api"),
    ]:
        assert Path(module.__file__ or "").parent.name == folder


def test_wheel_contains_every_subpackage_and_the_schemas(tmp_path: Path) -> None:
    """`pip wheel .` builds a wheel with all six packages, the .avsc files and the script."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("auditpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "auditpipe/__init__.py",
        "auditpipe/cli.py",
        "auditpipe/producer/__init__.py",
        "auditpipe/processors/app.py",
        "auditpipe/sinks/runner.py",
        "auditpipe/schemas/codec.py",
        "auditpipe/api/app.py",
        "auditpipe/embedded_pg.py",
        "auditpipe/schemas/audit_event.v1.avsc",
        "auditpipe/schemas/registry.json",
    ]:
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert (
        "auditpipe = auditpipe.cli:main" in text
        and "stdout = auditpipe.sinks.stdout:StdoutSink" in text
    )
