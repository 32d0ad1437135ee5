"""Processor workers as users run them (`auditpipe process --config FILE`), for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from auditpipe.settings import Settings, load_settings


def write_config(settings: Settings, path: Path, steps: list[str] | None = None) -> Path:
    k, p = settings.kafka, settings.processors
    path.write_text(
        f'[kafka]\nbootstrap = "{k.bootstrap}"\nraw_topic = "{k.raw_topic}"\n'
        f'events_topic = "{k.events_topic}"\ndlq_topic = "{k.dlq_topic}"\n'
        f"partitions = {k.partitions}\n"
        f'[processors]\napp_id = "{p.app_id}"\ndata_dir = "{p.data_dir}"\n'
        f"session_timeout_secs = {p.session_timeout_secs}\n"
        f"heartbeat_interval_secs = {p.heartbeat_interval_secs}\n"
        + (f"web_port = {p.web_port}\n" if p.web_port else "")
        + (f"step_processes = {p.step_processes}\n" if p.step_processes else "")
        + (f"[pipeline]\nsteps = {steps!r}\n".replace("'", '"') if steps is not None else "")
        + (f"[metrics]\nport = {settings.metrics.port}\n" if settings.metrics.port else "")
        + _logging_table(settings)
    )
    return path


def _logging_table(settings: Settings) -> str:
    lg = settings.logging
    lines = [f'format = "{lg.format}"'] if lg.format != "text" else []
    lines += [f'level = "{lg.level}"'] if lg.level is not None else []
    return "[logging]\n" + "\n".join(lines) + "\n" if lines else ""


def spawn_worker(
    settings: Settings,
    tmp_path: Path,
    name: str = "worker",
    steps: list[str] | None = None,
    own_group: bool = False,
) -> subprocess.Popen[bytes]:
    """`auditpipe process` as users run it, configured by a settings file (``own_group``: in
    a process group of its own, as a terminal or a service manager would start it)."""
    config = write_config(settings, tmp_path / f"{name}.toml", steps)
    load_settings(config, env={})  # the file itself must be valid
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "auditpipe", "process", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{name}.log", "wb"),
        start_new_session=own_group,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
