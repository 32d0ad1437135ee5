"""Real stores for the sink tests: a moto S3 server over HTTP and PostgreSQL.

- ``moto_endpoint`` (session): ``moto.server.ThreadedMotoServer`` on 127.0.0.1, a free port.
- ``pg_dsn`` (session): a database of this session's own on the machine's PostgreSQL
  (127.0.0.1:5432, user postgres, trust auth); if none answers, a throwaway cluster started
  with ``initdb``/``pg_ctl``. Fails (never skips) saying what is missing.
- :class:`FakeMongo`: ``mockupdb`` answering like a server (no MongoDB can be installed here).
- :class:`PgCluster`: a throwaway cluster a test owns and may stop and restart.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

S3_KEYS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoS3:
    """A moto server over HTTP; ``stop()``/``start()`` keep the buckets (state is in-process)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.running = True

    def stop(self) -> None:
        self._server.stop()
        self.running = False

    def client(self) -> object:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def new_bucket(self, object_lock: bool = False) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        kwargs = {"ObjectLockEnabledForBucket": True} if object_lock else {}
        self.client().create_bucket(Bucket=name, **kwargs)  # type: ignore[attr-defined]
        return name

    def sink_config(self, bucket: str, **extra: object) -> dict[str, object]:
        return {
            "bucket": bucket,
            "endpoint_url": self.endpoint,
            "path_style": True,
            "upload_timeout_secs": 5.0,
            **S3_KEYS,
            **extra,
        }


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# MongoDB (wire level)


def inserted_documents(req: Any) -> list[Any]:
    """The documents of an insert command (OP_MSG: a document sequence or the body)."""
    docs = req.doc.get("documents")
    return list(docs) if docs is not None else list(req.docs[1:])


class FakeMongo:
    """mockupdb answering like a server with one unique index on _id (inserts only)."""

    def __init__(self) -> None:
        from mockupdb import MockupDB

        self.docs: dict[str, dict[str, Any]] = {}
        self.commands: list[dict[str, Any]] = []
        # Override to answer inserts yourself: request -> reply document.
        self.insert_reply: Callable[[Any], dict[str, Any]] | None = None
        self.server = MockupDB()
        self.server.autoresponds(self._handle)
        self.server.run()
        self.uri = self.server.uri

    def _handle(self, req: Any) -> bool:
        name = req.command_name
        if name in ("hello", "ismaster", "isMaster"):
            return bool(req.reply({
                "ok": 1, "ismaster": True, "isWritablePrimary": True,
                "maxWireVersion": 21, "minWireVersion": 0,
            }))  # fmt: skip
        self.commands.append(dict(req.doc))
        if name == "insert" and self.insert_reply is not None:
            return bool(req.reply(self.insert_reply(req)))
        if name == "insert":
            errors = []
            docs = inserted_documents(req)
            for i, doc in enumerate(docs):
                if doc["_id"] in self.docs:
                    errors.append({"index": i, "code": 11000, "errmsg": "E11000 duplicate key"})
                else:
                    self.docs[doc["_id"]] = dict(doc)
            reply: dict[str, Any] = {"ok": 1, "n": len(docs) - len(errors)}
            if errors:
                reply["writeErrors"] = errors
            return bool(req.reply(reply))
        return bool(req.reply({"ok": 1}))

    def stop(self) -> None:
        self.server.stop()


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bin(name: str) -> str:
    for candidate in [shutil.which(name), *sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        f"PostgreSQL: nothing answers on 127.0.0.1:5432 and `{name}` is not installed "
        "(apt-get install postgresql) to start a throwaway cluster"
    )


class PgCluster:
    """A throwaway PostgreSQL cluster in a temp dir (run as user postgres when we are root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="auditpipe-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.dir, *_pg_ids())
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(
            _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr or out.stdout}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
            "-o", opts, "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def _system_pg() -> str | None:
    try:
        import psycopg

        with psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3, autocommit=True
        ):
            return "postgresql://postgres@127.0.0.1:5432/test"
    except Exception:
        return None


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A fresh database of this session's own; dropped at the end."""
    import psycopg

    cluster = None
    admin = _system_pg()
    if admin is None:
        cluster = PgCluster()
        cluster.start()
        admin = cluster.dsn
    name = f"auditpipe_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if cluster is not None:
            cluster.destroy()
