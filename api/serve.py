"""``auditpipe serve`` and ``auditpipe export``: settings, the database, the listening socket.

Both read the PostgreSQL sink's tables as ``[sinks.postgres]`` configures them (``dsn`` and
``schema_name``); with no ``dsn`` they use the embedded PostgreSQL in ``embedded_data_dir``,
the same one ``auditpipe dev --sink postgres`` wrote to (run them from the same directory).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from collections.abc import Iterator

from auditpipe.sinks.postgres import API_CHANGES_TABLE, PostgresConfig, acquire_dsn, migration_sql

from auditpipe.errors import AuditpipeError, ConfigError
from auditpipe.settings import ServeSettings, Settings, validate_model

from .auth import KeyRing, is_loopback


def postgres_config(settings: Settings, origin: str) -> PostgresConfig:
    return validate_model(
        PostgresConfig, dict(settings.sinks.get("postgres") or {}), origin, prefix="sinks.postgres"
    )


def describe_store(config: PostgresConfig) -> str:
    if config.dsn:
        return f"PostgreSQL (sinks.postgres.dsn), schema {config.schema_name}"
    return f"embedded PostgreSQL in {config.embedded_data_dir}, schema {config.schema_name}"


@contextlib.contextmanager
def database(config: PostgresConfig) -> Iterator[str]:
    """The DSN of the sink's database for the duration (the embedded one started if needed)."""
    dsn, release = acquire_dsn(config)
    try:
        yield dsn
    finally:
        release()


def prepare_schema(dsn: str, config: PostgresConfig, migrate: bool) -> None:
    """Create or upgrade the tables (``migrate``), or check that they are there."""
    import psycopg

    try:
        timeout = max(1, int(config.connect_timeout_secs))
        with psycopg.connect(dsn, autocommit=True, connect_timeout=timeout) as conn:
            if migrate:
                conn.execute(migration_sql(config.schema_name))
                return
            row = conn.execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s AND "
                "((table_name = 'metadata' AND column_name = 'api_metadata') OR "
                "(table_name = %s AND column_name = 'id'))",
                (config.schema_name, API_CHANGES_TABLE),
            ).fetchone()
    except psycopg.OperationalError as exc:
        raise AuditpipeError(f"cannot reach the database (sinks.postgres.dsn): {exc}") from None
    except psycopg.Error as exc:
        raise AuditpipeError(
            f"cannot create or upgrade the tables in schema {config.schema_name!r}: {exc}; "
            "run `auditpipe sink postgres --migrate` as a user allowed to"
        ) from None
    if not row or row[0] != 2:
        raise ConfigError(
            f"the tables in schema {config.schema_name!r} are missing or older than this "
            "version: run `auditpipe sink postgres --migrate` (or set [serve] migrate = true)"
        )


def check_access(serve: ServeSettings, origin: str) -> KeyRing:
    keys = KeyRing(serve)
    if keys.open and not is_loopback(serve.host):
        raise ConfigError(
            f"{origin}: [serve] api_keys is empty, so serve refuses to listen on {serve.host!r} "
            "(not a loopback address): set [serve] api_keys (or AUDITPIPE_SERVE_API_KEYS=KEY) "
            "or listen on 127.0.0.1"
        )
    return keys


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} ([serve] host / port): {exc.strerror or exc}"
        ) from None
    sock.set_inheritable(True)
    return sock


def run_serve(settings: Settings, origin: str) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean shutdown."""
    import uvicorn

    from .app import create_app
    from .erasure import erasing_deleter
    from .store import Store, delete_completion

    serve = settings.serve
    keys = check_access(serve, origin)
    config = postgres_config(settings, origin)
    sock = bind(serve.host, serve.port)
    with database(config) as dsn:
        prepare_schema(dsn, config, serve.migrate)
        from auditpipe.metrics import RequestMetrics, make_registry, serve_thread

        # DELETE erases the record from every configured store (docs/privacy.md)
        others = [n for n in settings.sinks if n != "postgres"]
        min_days = settings.privacy.min_retention_days
        deleter = (
            erasing_deleter(settings.sinks, origin, min_days)
            if others or min_days
            else delete_completion
        )
        app = RequestMetrics(
            create_app(Store(config, serve, dsn), keys, page_size=serve.page_size,
                       deleter=deleter),
            "serve",
        )  # fmt: skip
        m = settings.metrics
        metrics = serve_thread(make_registry(app.source())[0], m.host, m.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        access = (
            "no API keys: open to local processes only"
            if keys.open
            else f"{len(serve.api_keys)} read-write and {len(serve.read_api_keys)} read-only key(s)"
        )
        print(
            f"auditpipe serve: http://{shown}:{port}/ (viewer), http://{shown}:{port}/v1 "
            f"(OpenAI stored chat completions); {describe_store(config)}; {access}",
            file=sys.stderr,
            flush=True,
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="on", server_header=False
            )
        )
        # uvicorn re-raises the signal that stopped it once it has shut down; with SIGTERM's
        # default action that would kill the process before the database is let go
        previous = signal.signal(signal.SIGTERM, _exit_cleanly)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            if metrics is not None:
                metrics.close()
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def parse_pairs(values: list[str] | None, option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in values or ():
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {raw!r}: expected KEY=VALUE")
        out[key] = value
    return out
