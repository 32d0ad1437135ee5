"""The embedded PostgreSQL: the one-machine default store of the postgres sink, serve and export.

With no ``[sinks.postgres] dsn``, auditpipe runs PostgreSQL itself from the binaries shipped in
the ``pgserver`` wheel (the ``dev`` extra), with its data in ``embedded_data_dir`` (default
``./.auditpipe/postgres``, relative to the working directory). Every auditpipe process that
needs it (the sink of ``auditpipe dev``, ``auditpipe serve``, ``auditpipe export``) calls
:meth:`EmbeddedPostgres.acquire`, which starts the server unless it already runs, and
:meth:`EmbeddedPostgres.release` (also at interpreter exit), which stops it once no live
process uses it any more. Which processes use it is kept beside the data directory
(``postgres.users.json``, guarded by ``postgres.lock`` with ``flock``); a process that died
without releasing is pruned by the next one that looks, so a killed process at worst leaves the
server running until the next auditpipe process comes and goes.

The server listens on a Unix socket only (in the data directory, or under the temporary
directory when that path is too long for a socket), never on TCP, and trusts local
connections: the data directory's permissions are the access control. PostgreSQL refuses to
run as root; as root the server runs as the system user ``pgserver`` (created when missing,
as the pgserver package itself does), which then owns the data directory.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import AuditpipeError, ConfigError

log = logging.getLogger("auditpipe.embedded_pg")

DEFAULT_DATA_DIR = ".auditpipe/postgres"
RUN_AS_WHEN_ROOT = "pgserver"
_PORT = 5432  # names the socket file only: the server listens on no TCP port
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin

_local_lock = threading.Lock()
_local_users: dict[Path, int] = {}  # data dir -> acquisitions held by this process


class EmbeddedPostgresError(AuditpipeError):
    """The embedded server could not be initialised, started or stopped (the message says why)."""


def pg_bin_dir() -> Path:
    """The directory of the PostgreSQL binaries shipped in the pgserver wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no [sinks.postgres] dsn is set and the embedded PostgreSQL is not installed: "
            "pip install 'auditpipe[dev]' (it brings pgserver), or set [sinks.postgres] dsn"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise ConfigError(f"pgserver is installed but has no PostgreSQL binaries in {path}")
    return path


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (Linux), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0  # alive, start time unknown (not Linux)


def _alive(pid: int, started: int) -> bool:
    now = _start_time(pid)
    return now is not None and (started == 0 or now == 0 or now == started)


class EmbeddedPostgres:
    """A PostgreSQL server for one data directory, shared by the processes that acquire it."""

    def __init__(self, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        parent = self.data_dir.parent
        self._lock_path = parent / f"{self.data_dir.name}.lock"
        self._users_path = parent / f"{self.data_dir.name}.users.json"
        self._run_as = RUN_AS_WHEN_ROOT if os.geteuid() == 0 else None

    # -- public ---------------------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        if len(str(self.data_dir / f".s.PGSQL.{_PORT}")) <= _SOCKET_PATH_MAX:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"auditpipe-pg-{digest}"

    @property
    def dsn(self) -> str:
        """libpq key/value connection string (Unix socket, user postgres, database postgres)."""
        host = str(self.socket_dir).replace("\\", "\\\\").replace("'", "\\'")
        return f"host='{host}' port={_PORT} user=postgres dbname=postgres"

    def acquire(self) -> str:
        """Start the server unless it runs, register this process as a user; return the DSN."""
        with _local_lock:
            count = _local_users.get(self.data_dir, 0)
            if count == 0:
                with self._locked():
                    self._ensure_running()
                    users = self._live_users()
                    users[str(os.getpid())] = _start_time(os.getpid()) or 0
                    self._write_users(users)
                atexit.register(self._release_all)
            _local_users[self.data_dir] = count + 1
        return self.dsn

    def release(self) -> None:
        """Undo one :meth:`acquire`; the last user of the server (across processes) stops it."""
        with _local_lock:
            count = _local_users.get(self.data_dir, 0)
            if count > 1:
                _local_users[self.data_dir] = count - 1
                return
            if count == 0:
                return
            del _local_users[self.data_dir]
            atexit.unregister(self._release_all)
            self._deregister()

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """``with EmbeddedPostgres(dir).running() as dsn:`` acquire ... release."""
        dsn = self.acquire()
        try:
            yield dsn
        finally:
            self.release()

    def is_running(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return False
        return _start_time(pid) is not None and len(lines) >= 8 and lines[7].strip() == "ready"

    def stop(self) -> None:
        """Stop the server now, whoever uses it (tests, `auditpipe` never calls this itself)."""
        with self._locked():
            if self.is_running():
                self._pg_ctl("-m", "fast", "-w", "stop")
            self._write_users({})

    # -- internals ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _live_users(self) -> dict[str, int]:
        try:
            users = json.loads(self._users_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(users, dict):
            return {}
        return {pid: int(t) for pid, t in users.items() if _alive(int(pid), int(t))}

    def _write_users(self, users: dict[str, int]) -> None:
        tmp = self._users_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(users))
        tmp.replace(self._users_path)

    def _deregister(self) -> None:
        with self._locked():
            users = self._live_users()
            users.pop(str(os.getpid()), None)
            self._write_users(users)
            running = self.is_running()
            log.info("embedded PostgreSQL: released by %d; users left %s, running %s",
                     os.getpid(), sorted(users), running)  # fmt: skip
            if not users and running:
                try:
                    self._pg_ctl("-m", "fast", "-w", "stop")
                except EmbeddedPostgresError as exc:
                    log.warning("embedded PostgreSQL: %s", exc)

    def _release_all(self) -> None:
        with _local_lock:
            if _local_users.pop(self.data_dir, 0):
                self._deregister()

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        as_user: dict[str, object] = {}
        if self._run_as is not None:
            import pwd

            entry = pwd.getpwnam(self._run_as)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        return subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, cwd="/",
            stdin=subprocess.DEVNULL, **as_user,  # type: ignore[call-overload]
        )  # fmt: skip

    def _pg_ctl(self, *args: str) -> None:
        out = self._run(str(pg_bin_dir() / "pg_ctl"), "-D", str(self.data_dir), *args)
        if out.returncode != 0:
            raise EmbeddedPostgresError(
                f"pg_ctl {args[-1]} failed for {self.data_dir}: "
                f"{(out.stderr or out.stdout).strip()}{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "log").read_text(errors="replace").splitlines()[-10:]
        except OSError:
            return ""
        return "\n  server log (last lines):\n    " + "\n    ".join(lines) if lines else ""

    def _ensure_running(self) -> None:
        bindir = pg_bin_dir()
        if self._run_as is not None:
            self._prepare_for_user(bindir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bindir)
        if self.is_running():
            return
        sock = self.socket_dir
        if sock != self.data_dir:
            sock.mkdir(mode=0o700, exist_ok=True)
            if self._run_as is not None:
                _chown(sock, self._run_as)
        options = f"-c listen_addresses='' -k {shlex.quote(str(sock))} -p {_PORT}"
        self._pg_ctl("-w", "-t", "60", "-l", str(self.data_dir / "log"), "-o", options, "start")
        log.info("embedded PostgreSQL started in %s", self.data_dir)

    def _initdb(self, bindir: Path) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.data_dir} is not empty and holds no PostgreSQL cluster (no PG_VERSION): "
                "point [sinks.postgres] embedded_data_dir at an empty or missing directory"
            )
        if self._run_as is not None:
            _chown(self.data_dir, self._run_as)
        out = self._run(
            str(bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if out.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed for {self.data_dir}: {(out.stderr or out.stdout).strip()}"
            )
        log.info("embedded PostgreSQL initialised in %s", self.data_dir)

    def _prepare_for_user(self, bindir: Path) -> None:
        """As root: the run-as user exists and can reach the binaries and the data directory."""
        import pwd

        assert self._run_as is not None
        try:
            pwd.getpwnam(self._run_as)
        except KeyError:
            out = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 self._run_as],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise EmbeddedPostgresError(
                    f"PostgreSQL does not run as root and creating the user {self._run_as!r} "
                    f"failed: {out.stderr.strip()}; run auditpipe as a normal user"
                ) from None
        for path in (bindir.parent, self.data_dir.parent):
            _allow_traverse(path)
        if self.data_dir.exists():
            _chown(self.data_dir, self._run_as)


def _chown(path: Path, user: str) -> None:
    import pwd

    entry = pwd.getpwnam(user)
    if path.stat().st_uid != entry.pw_uid:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _allow_traverse(path: Path) -> None:
    """Give others execute (traverse) permission on ``path`` and its parents where missing."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & 0o001:
            log.info("embedded PostgreSQL: chmod o+x %s (the server user must reach it)", directory)
            directory.chmod(mode | 0o001)
