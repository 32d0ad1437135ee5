"""postgres: the inference-log schema (requests, responses, errors, metadata) in PostgreSQL.

Tables, in ``schema_name`` (created by ``auditpipe sink postgres --migrate``, or at start with
``auto_migrate = true``); every id is the event's ``event_id`` (TEXT, time-ordered)::

    requests  (id PK, timestamp TIMESTAMPTZ, request_id, endpoint, model,
               parameters JSONB, inputs JSONB, outputs JSONB, raw_request JSONB)
    responses (id PK -> requests, model_name, model_version, timestamp TIMESTAMPTZ,
               parameters JSONB, outputs JSONB, raw_response JSONB)         -- when output
    errors    (id PK -> requests, error TEXT, response JSONB)               -- when error/4xx/5xx
    metadata  (id PK -> requests, metadata JSONB)     -- the rest of the event, losslessly

``parameters`` of a request are its input without the messages/prompt; ``inputs`` the
messages (or prompt); ``raw_request``/``raw_response`` the input/output as captured.
``metadata.metadata`` holds every other event field (ids, trace, usage, caller metadata,
processing steps...), so the event can be rebuilt from the four tables.

Loading: each batch is COPYed into a temporary staging table and moved with
``INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING`` in one transaction, so a redelivered
event is a no-op. Connection errors are retriable; data PostgreSQL refuses (for example a
``\\u0000`` in JSON) is a permanent error, which the runner narrows down to the event.

Retention: with ``retention_days`` set, requests older than that (and, by cascade, their
other rows) are deleted every ``retention_interval_secs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from auditpipe.schemas import Event
from pydantic import Field

from auditpipe.errors import ConfigError
from auditpipe.settings import StrictModel

from .base import PermanentSinkError, RetriableSinkError, Sink

log = logging.getLogger("auditpipe.sinks.postgres")

TABLES = ("requests", "responses", "errors", "metadata")


class PostgresConfig(StrictModel):
    dsn: str = Field(description="libpq connection string or postgresql:// URL")
    schema_name: str = Field("auditpipe", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(4, ge=1)
    write_concurrency: int = Field(
        2, ge=1, description="a batch is split into this many transactions run in parallel"
    )
    connect_timeout_secs: float = Field(10.0, gt=0)
    statement_timeout_secs: float = Field(60.0, gt=0)
    auto_migrate: bool = Field(False, description="create the tables at start if missing")
    retention_days: float | None = Field(None, gt=0, description="delete older requests")
    retention_interval_secs: float = Field(3600.0, gt=0)


def migration_sql(schema: str) -> str:
    s = f'"{schema}"'
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.requests (
    id TEXT PRIMARY KEY,
    "timestamp" TIMESTAMPTZ NOT NULL,
    request_id TEXT,
    endpoint TEXT,
    model TEXT,
    parameters JSONB,
    inputs JSONB,
    outputs JSONB,
    raw_request JSONB
);
CREATE INDEX IF NOT EXISTS requests_timestamp_idx ON {s}.requests ("timestamp");
CREATE INDEX IF NOT EXISTS requests_request_id_idx ON {s}.requests (request_id);
CREATE INDEX IF NOT EXISTS requests_model_idx ON {s}.requests (model);
CREATE TABLE IF NOT EXISTS {s}.responses (
    id TEXT PRIMARY KEY REFERENCES {s}.requests (id) ON DELETE CASCADE,
    model_name TEXT,
    model_version TEXT,
    "timestamp" TIMESTAMPTZ,
    parameters JSONB,
    outputs JSONB,
    raw_response JSONB
);
CREATE TABLE IF NOT EXISTS {s}.errors (
    id TEXT PRIMARY KEY REFERENCES {s}.requests (id) ON DELETE CASCADE,
    error TEXT,
    response JSONB
);
CREATE TABLE IF NOT EXISTS {s}.metadata (
    id TEXT PRIMARY KEY REFERENCES {s}.requests (id) ON DELETE CASCADE,
    metadata JSONB
);
DO $$ BEGIN  -- lz4 TOAST compression (PostgreSQL 14+ built with lz4): about 2x faster loads
    IF current_setting('server_version_num')::int >= 140000 THEN
        BEGIN
            ALTER TABLE {s}.requests ALTER COLUMN parameters SET COMPRESSION lz4,
                ALTER COLUMN inputs SET COMPRESSION lz4, ALTER COLUMN outputs SET COMPRESSION lz4,
                ALTER COLUMN raw_request SET COMPRESSION lz4;
            ALTER TABLE {s}.responses ALTER COLUMN parameters SET COMPRESSION lz4,
                ALTER COLUMN outputs SET COMPRESSION lz4,
                ALTER COLUMN raw_response SET COMPRESSION lz4;
            ALTER TABLE {s}.errors ALTER COLUMN response SET COMPRESSION lz4;
            ALTER TABLE {s}.metadata ALTER COLUMN metadata SET COMPRESSION lz4;
        EXCEPTION WHEN OTHERS THEN NULL;  -- a build without lz4 keeps the default
        END;
    END IF;
END $$;
"""


def _load_sql(schema: str) -> list[str]:
    s = f'"{schema}"'
    inp, out = "inp", "out"
    return [
        f"""INSERT INTO {s}.requests
            (id, "timestamp", request_id, endpoint, model, parameters, inputs, raw_request)
        SELECT id, to_timestamp(ts_ms / 1000.0), ev->>'request_id', ev->>'endpoint', ev->>'model',
            CASE WHEN jsonb_typeof({inp}) = 'object'
                 THEN {inp} - 'messages' - 'prompt' - 'input' END,
            CASE WHEN jsonb_typeof({inp}) = 'object'
                 THEN COALESCE({inp}->'messages', {inp}->'prompt', {inp}->'input')
                 ELSE {inp} END,
            {inp}
        FROM auditpipe_stage ON CONFLICT (id) DO NOTHING""",
        f"""INSERT INTO {s}.responses
            (id, model_name, model_version, "timestamp", parameters, outputs, raw_response)
        SELECT id, ev->>'model',
            CASE WHEN jsonb_typeof({out}) = 'object' THEN {out}->>'model' END,
            to_timestamp((ts_ms + COALESCE((ev->>'latency_ms')::float8, 0)) / 1000.0),
            jsonb_strip_nulls(jsonb_build_object(
                'status_code', ev->'status_code', 'stream', ev->'stream',
                'latency_ms', ev->'latency_ms', 'ttft_ms', ev->'ttft_ms', 'usage', ev->'usage')),
            CASE WHEN jsonb_typeof({out}) = 'object'
                 THEN COALESCE({out}->'choices', {out}->'output', {out}->'outputs')
                 ELSE {out} END,
            {out}
        FROM auditpipe_stage
        WHERE {out} IS NOT NULL
        ON CONFLICT (id) DO NOTHING""",
        f"""INSERT INTO {s}.errors (id, error, response)
        SELECT id,
            COALESCE((ev->'error'->>'type') || ': ' || (ev->'error'->>'message'),
                     'HTTP ' || (ev->>'status_code')),
            {out}
        FROM auditpipe_stage
        WHERE (ev->'error' IS NOT NULL AND ev->'error' <> 'null'::jsonb)
           OR COALESCE((ev->>'status_code')::int, 0) >= 400
        ON CONFLICT (id) DO NOTHING""",
        f"""INSERT INTO {s}.metadata (id, metadata)
        SELECT id, ev FROM auditpipe_stage
        ON CONFLICT (id) DO NOTHING""",
    ]


def _json_field(value: Any) -> bytes:
    # orjson escapes control characters, so in COPY's text format only backslashes need doubling
    return b"\\N" if value is None else orjson.dumps(value).replace(b"\\", b"\\\\")


def _stage_row(event: Event) -> bytes:
    """One COPY text line: id, ts_ms, the envelope, input, output (split so that no staged
    value is large enough to be TOAST-compressed and decompressed again by every insert)."""
    envelope = {k: v for k, v in event.items() if k != "input" and k != "output"}
    return b"\t".join((
        _copy_text(str(event["event_id"]).encode()), b"%d" % event["ts_ms"],
        _json_field(envelope), _json_field(event.get("input")), _json_field(event.get("output")),
    )) + b"\n"  # fmt: skip


def _copy_text(value: bytes) -> bytes:
    """Escape a value for COPY's text format."""
    return (
        value.replace(b"\\", b"\\\\")
        .replace(b"\t", b"\\t")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
    )


class PostgresSink(Sink):
    """COPY into a staging table, then insert-on-conflict-do-nothing into the four tables."""

    name = "postgres"
    Config = PostgresConfig
    config: PostgresConfig

    def __init__(self, config: StrictModel | None = None) -> None:
        super().__init__(config)
        self._pool: Any = None
        self._retention: asyncio.Task[None] | None = None
        self._load = _load_sql(self.config.schema_name)

    def _conninfo(self) -> tuple[str, dict[str, Any]]:
        c = self.config
        return c.dsn, {
            "connect_timeout": max(1, int(c.connect_timeout_secs)),
            "options": f"-c statement_timeout={int(c.statement_timeout_secs * 1000)}",
            "application_name": "auditpipe-sink",
        }

    async def migrate(self) -> None:
        """Create the schema, tables and indexes (idempotent)."""
        import psycopg

        dsn, kwargs = self._conninfo()
        try:
            async with await psycopg.AsyncConnection.connect(dsn, **kwargs) as conn:
                await conn.execute(migration_sql(self.config.schema_name))
        except psycopg.OperationalError as exc:
            raise RetriableSinkError(
                f"postgres sink: cannot connect (sinks.postgres.dsn): {exc}"
            ) from exc

    async def start(self) -> None:
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        if self.config.auto_migrate:
            await self.migrate()
        dsn, kwargs = self._conninfo()
        c = self.config
        self._pool = AsyncConnectionPool(
            dsn, kwargs=kwargs, min_size=c.pool_min_size, max_size=c.pool_max_size,
            open=False, timeout=c.connect_timeout_secs,
        )  # fmt: skip
        await self._pool.open()
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = %s AND table_name = ANY(%s)",
                    (c.schema_name, list(TABLES)),
                )
                row = await cur.fetchone()
        except (psycopg.OperationalError, Exception) as exc:
            await self.stop()
            if isinstance(exc, ConfigError):
                raise
            raise RetriableSinkError(
                f"postgres sink: cannot reach the database (sinks.postgres.dsn): {exc}"
            ) from exc
        if not row or row[0] != len(TABLES):
            await self.stop()
            raise ConfigError(
                f"postgres sink: tables missing in schema {c.schema_name!r}; run "
                "`auditpipe sink postgres --migrate --config FILE` (or set auto_migrate = true)"
            )
        if c.retention_days is not None:
            self._retention = asyncio.create_task(self._retention_loop())

    async def stop(self) -> None:
        task, self._retention = self._retention, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def write(self, batch: Sequence[Event]) -> None:

        if self._pool is None:
            raise RetriableSinkError("postgres sink: not started")
        if not batch:
            return
        parts = min(self.config.write_concurrency, max(1, len(batch) // 50))
        size = -(-len(batch) // parts)
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
        # Chunks commit separately: after a partial failure the retry rewrites all (no-ops).
        results = await asyncio.gather(
            *(self._load_chunk(c) for c in chunks), return_exceptions=True
        )
        for result in results:
            if isinstance(result, PermanentSinkError):
                raise result
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _load_chunk(self, events: Sequence[Event]) -> None:
        import psycopg

        assert self._pool is not None
        data = b"".join(_stage_row(e) for e in events)
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS auditpipe_stage "
                    "(id TEXT, ts_ms BIGINT, ev JSONB, inp JSONB, out JSONB) ON COMMIT DELETE ROWS"
                )
                async with conn.cursor().copy(
                    "COPY auditpipe_stage (id, ts_ms, ev, inp, out) FROM STDIN"
                ) as copy:
                    await copy.write(data)
                for sql in self._load:
                    await conn.execute(sql)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise PermanentSinkError(f"postgres sink: rejected: {exc}") from exc
        except (psycopg.Error, OSError) as exc:
            raise RetriableSinkError(f"postgres sink: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # pool timeout and the like
            raise RetriableSinkError(f"postgres sink: {type(exc).__name__}: {exc}") from exc

    async def prune(self) -> int:
        """Delete requests (and their rows) older than ``retention_days``; return how many."""
        days = self.config.retention_days
        if days is None or self._pool is None:
            return 0
        s = f'"{self.config.schema_name}"'
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f'DELETE FROM {s}.requests WHERE "timestamp" < now() - make_interval(secs => %s)',
                (days * 86400,),
            )
            return cur.rowcount or 0

    async def _retention_loop(self) -> None:
        while True:
            try:
                deleted = await self.prune()
                if deleted:
                    log.info("postgres sink: retention deleted %d request(s)", deleted)
            except Exception as exc:
                log.warning("postgres sink: retention failed: %s", exc)
            await asyncio.sleep(self.config.retention_interval_secs)
