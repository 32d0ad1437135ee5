"""docker-compose.yml and the Dockerfile: commands, settings and wiring that can be checked here.

No container engine runs in the tests: the file is checked by parsing it (every auditpipe
service's command is a real `auditpipe` command line, every AUDITPIPE_* variable is a setting
with a valid value, health checks and start order) and by `docker-compose config`, which
validates it without an engine, when the binary is installed (scripts/setup-system installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from auditpipe.sinks.base import load_sink_class
from pydantic import BaseModel

from auditpipe.cli import build_parser
from auditpipe.settings import Settings, load_settings, validate_model

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
_DEFAULT = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def auditpipe_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("image", "").startswith("auditpipe") or "build" in svc
    }


def resolved_env(svc: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ${VAR:-default} replaced by its default."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _DEFAULT.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def sink_tables(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """``AUDITPIPE_SINKS_<NAME>_<KEY>`` grouped as ``{name: {key: value}}`` (installed sinks)."""
    from auditpipe.sinks import available_sinks

    names = sorted(available_sinks(), key=len, reverse=True)
    tables: dict[str, dict[str, str]] = {}
    for var, value in env.items():
        if not var.startswith("AUDITPIPE_SINKS_"):
            continue
        rest = var[len("AUDITPIPE_SINKS_") :].lower()
        name = next((n for n in names if rest.startswith(n + "_")), None)
        assert name, f"{var}: no installed sink is named by it"
        tables.setdefault(name, {})[rest[len(name) + 1 :]] = value
    return tables


class TestComposeFile:
    def test_parses_with_the_services_the_pipeline_needs(self) -> None:
        """Kafka, the init services, the stores, processor, one runner per store, serve, demo."""
        services = compose()["services"]
        for name in ("kafka", "topics", "minio", "minio-bucket", "mongodb", "postgres",
                     "migrate", "processor", "sink-s3", "sink-mongodb", "sink-postgres",
                     "serve", "demo"):  # fmt: skip
            assert name in services, name
        assert services["demo"]["profiles"] == ["demo"]
        assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert "zookeeper" not in services

    def test_every_command_is_a_real_auditpipe_command(self) -> None:
        """Each auditpipe service's command parses with auditpipe's own argument parser."""
        parser = build_parser()
        for name, svc in auditpipe_services().items():
            command = svc["command"]
            assert isinstance(command, list), f"{name}: use the exec (list) form"
            try:
                args = parser.parse_args(command)
            except SystemExit:
                pytest.fail(f"service {name}: `auditpipe {' '.join(command)}` does not parse")
            assert callable(args.func), name

    def test_each_sink_runner_runs_an_installed_sink(self) -> None:
        """sink-NAME runs `auditpipe sink NAME` for s3, mongodb and postgres."""
        from auditpipe.sinks import available_sinks

        for store in ("s3", "mongodb", "postgres"):
            command = compose()["services"][f"sink-{store}"]["command"]
            assert command == ["sink", store] and store in available_sinks()

    def test_every_auditpipe_variable_is_a_setting_with_a_valid_value(self) -> None:
        """AUDITPIPE_<TABLE>_<KEY> is a field of that table; the values load without error."""
        for name, svc in auditpipe_services().items():
            env = resolved_env(svc)
            assert all(k.startswith("AUDITPIPE_") for k in env), f"{name}: only AUDITPIPE_*"
            plain = {k: v for k, v in env.items() if not k.startswith("AUDITPIPE_SINKS_")}
            tables = {
                t: f.annotation
                for t, f in Settings.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
            }
            for var in plain:
                table, _, key = var[len("AUDITPIPE_") :].lower().partition("_")
                assert table in tables, f"{name}: {var}: no [{table}] table"
                model = tables[table]
                assert key in model.model_fields, f"{name}: {var}: no key {key} in [{table}]"
            load_settings(env=plain)  # values valid (raises ConfigError naming the key)

    def test_every_sink_variable_is_a_key_of_that_sinks_config(self) -> None:
        """AUDITPIPE_SINKS_<NAME>_<KEY>: a field of the sink's config model; the table is valid."""
        for name, svc in auditpipe_services().items():
            for sink, table in sink_tables(resolved_env(svc)).items():
                config = load_sink_class(sink).Config
                for key in table:
                    assert key in config.model_fields, f"{name}: [sinks.{sink}] has no key {key}"
                validate_model(config, table, f"docker-compose.yml {name}", f"sinks.{sink}")

    def test_sink_variables_reach_the_settings_when_the_env_rule_exists(self) -> None:
        """Once [sinks.NAME] takes env overrides (issue 14, item 4), they load as [sinks.NAME]."""
        probe = load_settings(env={"AUDITPIPE_SINKS_POSTGRES_DSN": "postgresql://x/y"})
        if "postgres" not in probe.sinks:
            pytest.skip("AUDITPIPE_SINKS_* overrides are not on this branch yet (issue 14 item 4)")
        for svc in auditpipe_services().values():
            env = resolved_env(svc)
            settings = load_settings(env=env)
            for sink, table in sink_tables(env).items():
                for key, value in table.items():
                    assert str(settings.sinks[sink][key]).lower() == value.lower()

    def test_sink_runners_and_serve_get_what_they_need(self) -> None:
        """s3: bucket; postgres: dsn (also serve, migrate); serve on 0.0.0.0: api keys."""
        services = compose()["services"]
        assert "AUDITPIPE_SINKS_S3_BUCKET" in services["sink-s3"]["environment"]
        for name in ("sink-postgres", "serve", "migrate"):
            assert "AUDITPIPE_SINKS_POSTGRES_DSN" in services[name]["environment"], name
        serve = resolved_env(services["serve"])
        assert serve["AUDITPIPE_SERVE_API_KEYS"], "serve listens on 0.0.0.0: it needs api keys"

    def test_start_order_uses_health_and_completion(self) -> None:
        """Long-running services wait for healthy dependencies; one-shots for completion."""
        services = compose()["services"]
        one_shots = {n for n, s in services.items() if s.get("restart") == "no"}
        assert one_shots == {"topics", "minio-bucket", "migrate"}
        for name, svc in services.items():
            for dep, cond in (svc.get("depends_on") or {}).items():
                want = "service_completed_successfully" if dep in one_shots else "service_healthy"
                assert cond == {"condition": want}, f"{name} -> {dep}"
                if want == "service_healthy":
                    assert "healthcheck" in services[dep], f"{dep} has no health check"
        for name, svc in services.items():
            if name not in one_shots and "profiles" not in svc:
                assert "healthcheck" in svc, f"{name}: long-running without a health check"
        for name in ("processor", "sink-s3", "sink-mongodb", "sink-postgres", "demo"):
            assert services[name]["depends_on"]["topics"]["condition"] == (
                "service_completed_successfully"
            )

    def test_named_volumes_only(self) -> None:
        """State lives in named volumes declared at the top level (no host paths)."""
        data = compose()
        declared = set(data["volumes"])
        for name, svc in data["services"].items():
            for volume in svc.get("volumes", []):
                source = volume.split(":", 1)[0]
                assert source in declared, f"{name}: {volume} is not a named volume"

    def test_processor_scales(self) -> None:
        """No container_name or fixed host port on the processor, so --scale works."""
        processor = compose()["services"]["processor"]
        assert "container_name" not in processor and "ports" not in processor
        assert "replicas" in processor["deploy"]

    @pytest.mark.skipif(
        shutil.which("docker-compose") is None,
        reason="docker-compose is not installed (scripts/setup-system installs it)",
    )
    def test_docker_compose_config_accepts_it(self) -> None:
        """`docker-compose config` validates the file (no engine needed)."""
        p = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
        assert p.returncode == 0, p.stderr
        cmd = ["docker-compose", "-f", str(COMPOSE), "--profile", "demo", "config", "--services"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        assert "demo" in p.stdout.split()


class TestDockerfile:
    def test_multi_stage_non_root_with_auditpipe_entrypoint(self) -> None:
        """Two stages, a slim Python base, a non-root user, ENTRYPOINT auditpipe."""
        text = DOCKERFILE.read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) == 2
        assert "python:3.12-slim" in text
        user = re.findall(r"^USER (\S+)", text, re.M)
        assert user and user[-1] not in ("root", "0")
        assert re.search(r'^ENTRYPOINT \["auditpipe"\]', text, re.M)

    def test_extras_and_copied_directories_exist(self) -> None:
        """The extras it installs are in pyproject; what it copies is every package dir."""
        text = DOCKERFILE.read_text()
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        extras = set(project["project"]["optional-dependencies"])
        for line in re.findall(r"^ARG EXTRAS=(\S+)", text, re.M):
            assert set(line.split(",")) <= extras, line
        copied = set(re.findall(r"^COPY (\S+) \./\1", text, re.M))
        dirs = set(project["tool"]["setuptools"]["package-dir"].values())
        assert dirs <= copied, f"not copied: {dirs - copied}"


class TestDemoCommand:
    def test_demo_sends_requests_through_the_audit_hook(self) -> None:
        """`auditpipe demo --requests 3`: three captured exchanges (stdout transport here)."""
        import orjson

        env = {**os.environ, "AUDITPIPE_PRODUCER_TRANSPORT": "stdout"}
        env.pop("AUDITPIPE_CONFIG", None)
        p = subprocess.run(
            [sys.executable, "-m", "auditpipe", "demo", "--port", "0", "--requests", "3"],
            env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr.decode()
        events = [orjson.loads(line) for line in p.stdout.splitlines() if line.strip()]
        assert len(events) == 3
        assert {e["model"] for e in events} == {"demo-echo-1"}
        assert all(e["status_code"] == 200 for e in events)
