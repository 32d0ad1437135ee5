"""postgres: the inference-log schema (requests, responses, errors, metadata) in PostgreSQL.

Where: ``dsn``, or with no ``dsn`` the embedded PostgreSQL (``auditpipe.embedded_pg``, data in
``embedded_data_dir``) that ``auditpipe serve`` and ``export`` share.

Tables, in ``schema_name`` (created by ``auditpipe sink postgres --migrate``, or at start with
``auto_migrate = true``); every id is the event's ``event_id`` (TEXT, time-ordered)::

    requests  (id PK, timestamp TIMESTAMPTZ, request_id, endpoint, model,
               parameters JSONB, inputs JSONB, outputs JSONB, raw_request JSONB)
    responses (id PK -> requests, model_name, model_version, timestamp TIMESTAMPTZ,
               parameters JSONB, outputs JSONB, raw_response JSONB)         -- when output
    errors    (id PK -> requests, error TEXT, response JSONB)               -- when error/4xx/5xx
    metadata  (id PK -> requests, metadata JSONB)     -- the rest of the event, losslessly

``parameters`` of a request are its input without the messages/prompt; ``inputs`` the
messages (or prompt); ``raw_request``/``raw_response`` the input/output as captured. An Open
Inference Protocol v2 request (its input has ``inputs``, or ``text_input`` for ``generate``)
maps as the protocol names it: ``parameters``, ``inputs`` and the requested ``outputs`` into
the columns of those names. Responses: ``model_name`` is the OIP response's ``model_name``,
else the event's model; ``model_version`` the OIP ``model_version`` (else an OpenAI response's
``model``, else the ``/versions/{version}`` segment of the endpoint); ``outputs`` the choices /
output / OIP ``outputs`` / ``text_output``; ``parameters`` the response's own ``parameters``
(OIP) with status, stream, latencies and usage.
``metadata.metadata`` holds every other event field (ids, trace, usage, caller metadata,
processing steps...), so the event can be rebuilt from the four tables.

Loading: each batch is COPYed (binary format) straight into the four tables in one
transaction, the rows built in Python with the same mapping as the SQL below. A redelivered
event makes that COPY fail on the primary key; the batch is then loaded the slow, idempotent
way: COPYed into a temporary staging table and moved with ``INSERT ... SELECT ... ON CONFLICT
(id) DO NOTHING``, so a redelivered event is a no-op. (Events whose shape the Python mapping
does not reproduce exactly, e.g. a non-string ``model``, take that way too.) Connection errors
are retriable; data PostgreSQL refuses (for example a ``\\u0000`` in JSON) is a permanent
error, which the runner narrows down to the event.

The read side (``auditpipe.api``) adds, through the same idempotent migration, the column
``metadata.api_metadata``, the table ``api_changes`` and its indexes; see "The read side's
public interface" below.

Retention: with ``retention_days`` set, requests older than that (and, by cascade, their
other rows) are deleted every ``retention_interval_secs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from auditpipe.schemas import Event
from pydantic import Field

from auditpipe.embedded_pg import DEFAULT_DATA_DIR
from auditpipe.errors import ConfigError
from auditpipe.settings import StrictModel

from .base import Batch, PermanentSinkError, RetriableSinkError, Sink

if TYPE_CHECKING:
    from auditpipe.privacy.erasure import EraseResult
    from auditpipe.privacy.selector import Selector

log = logging.getLogger("auditpipe.sinks.postgres")

TABLES = ("requests", "responses", "errors", "metadata")


class PostgresConfig(StrictModel):
    dsn: str | None = Field(
        None,
        description="libpq connection string or postgresql:// URL; unset: the embedded "
        "PostgreSQL (pgserver) with its data in embedded_data_dir",
    )
    embedded_data_dir: str = Field(
        DEFAULT_DATA_DIR,
        description="data directory of the embedded PostgreSQL used when dsn is unset "
        "(relative to the working directory); shared by the sink, serve and export",
    )
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
    """The whole schema, idempotent and additive: run on any earlier version, it upgrades it.

    Concurrent runs (a sink with auto_migrate and ``auditpipe serve`` starting together)
    serialise on an advisory lock held for the statement's implicit transaction.
    """
    s = f'"{schema}"'
    return f"""
SELECT pg_advisory_xact_lock(hashtext('auditpipe-migrate:' || {_literal(schema)}));
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
{_read_side_sql(s)}"""


# ---------------------------------------------------------------------------------------------
# The read side's public interface (used by auditpipe.api: serve, export, the viewer)
#
# Added to the schema above, additively: the metadata a caller set through the API
# (``metadata.api_metadata``, NULL while unchanged), the log of changes made through the API
# (``api_changes``: updates and deletes, who, when, which record, before and after), and the
# indexes the stored-completions API reads by: completion id, (created, id) keyset order of
# chat completions overall and per model, and the caller metadata (GIN, containment).

API_CHANGES_TABLE = "api_changes"
CHAT_COMPLETIONS_PREDICATE = "right(q.endpoint, 17) = '/chat/completions'"
"""Requests (alias ``q``) that are chat completions; the partial indexes below use it."""


def caller_metadata_sql(alias: str = "m") -> str:
    """The caller's metadata of a record as served: set through the API, else as captured."""
    return f"COALESCE({alias}.api_metadata, {alias}.metadata->'metadata')"


def completion_id_sql(alias: str = "r") -> str:
    """The completion id the client saw: the ``id`` of the stored response (``responses``)."""
    return f"({alias}.raw_response->>'id')"


def event_json_sql(q: str = "q", r: str = "r", m: str = "m") -> str:
    """The stored event rebuilt as JSONB from its rows (the caller metadata as served)."""
    return (
        f"({m}.metadata || jsonb_build_object('input', {q}.raw_request, 'output', "
        f"{r}.raw_response, 'metadata', {caller_metadata_sql(m)}))"
    )


def _read_side_sql(s: str) -> str:
    return f"""
ALTER TABLE {s}.metadata ADD COLUMN IF NOT EXISTS api_metadata JSONB;
CREATE INDEX IF NOT EXISTS metadata_caller_metadata_idx ON {s}.metadata
    USING gin ((COALESCE(api_metadata, metadata->'metadata')) jsonb_path_ops);
-- a finer sample of caller metadata: the planner then tells a filter matching 0.1% of the
-- records (read through this index) from one matching 10% (read in time order)
ALTER INDEX {s}.metadata_caller_metadata_idx ALTER COLUMN 1 SET STATISTICS 1000;
CREATE INDEX IF NOT EXISTS responses_completion_id_idx ON {s}.responses
    ((raw_response->>'id'), id);
CREATE INDEX IF NOT EXISTS requests_chat_created_idx ON {s}.requests ("timestamp", id)
    WHERE right(endpoint, 17) = '/chat/completions';
CREATE INDEX IF NOT EXISTS requests_chat_model_created_idx ON {s}.requests
    (model, "timestamp", id) WHERE right(endpoint, 17) = '/chat/completions';
CREATE INDEX IF NOT EXISTS requests_timestamp_id_idx ON {s}.requests ("timestamp", id);
DO $$ BEGIN  -- PostgreSQL 14+: how many requests are chat completions (the planner's estimate)
    IF current_setting('server_version_num')::int >= 140000 THEN
        EXECUTE 'CREATE STATISTICS IF NOT EXISTS {s}.requests_chat_stats '
             || 'ON (right(endpoint, 17)) FROM {s}.requests';
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS {s}.{API_CHANGES_TABLE} (
    id TEXT PRIMARY KEY,               -- the change's own event id (time-ordered)
    "timestamp" TIMESTAMPTZ NOT NULL,  -- when
    action TEXT NOT NULL,              -- update_metadata | delete
    completion_id TEXT,                -- the id the API served the record under
    event_id TEXT NOT NULL,            -- the record's event id
    record_timestamp TIMESTAMPTZ,      -- the record's own time (keeps pagination cursors valid)
    actor TEXT NOT NULL,               -- who: the API key's name or fingerprint, never the key
    client TEXT,                       -- the caller's address and user agent
    before JSONB,                      -- update: the caller metadata before
    after JSONB,                       -- update: the caller metadata after
    event JSONB                        -- the change as an AuditEvent (JSON rendering)
);
CREATE INDEX IF NOT EXISTS api_changes_completion_idx ON {s}.{API_CHANGES_TABLE}
    (completion_id, event_id);
CREATE INDEX IF NOT EXISTS api_changes_event_idx ON {s}.{API_CHANGES_TABLE} (event_id);
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def acquire_dsn(config: PostgresConfig) -> tuple[str, Callable[[], None]]:
    """The DSN to connect to and the function to call when done with it.

    With ``dsn`` set that is the DSN and a no-op; unset, the embedded PostgreSQL in
    ``embedded_data_dir`` is started (or joined) and released by the returned function.
    Blocks up to a few seconds the first time (initdb): call it off the event loop.
    """
    if config.dsn:
        return config.dsn, lambda: None
    from auditpipe.embedded_pg import EmbeddedPostgres

    embedded = EmbeddedPostgres(config.embedded_data_dir)
    return embedded.acquire(), embedded.release


def _load_sql(schema: str) -> list[str]:
    s = f'"{schema}"'
    inp, out = "inp", "out"
    oip = f"(jsonb_typeof({inp}) = 'object' AND ({inp} ? 'inputs' OR {inp} ? 'text_input'))"
    obj_out = f"jsonb_typeof({out}) = 'object'"
    return [
        f"""INSERT INTO {s}.requests
            (id, "timestamp", request_id, endpoint, model, parameters, inputs, outputs,
             raw_request)
        SELECT id, to_timestamp(ts_ms / 1000.0), ev->>'request_id', ev->>'endpoint', ev->>'model',
            CASE WHEN {oip} THEN {inp}->'parameters'
                 WHEN jsonb_typeof({inp}) = 'object'
                 THEN {inp} - 'messages' - 'prompt' - 'input' END,
            CASE WHEN {oip} THEN COALESCE({inp}->'inputs', {inp}->'text_input')
                 WHEN jsonb_typeof({inp}) = 'object'
                 THEN COALESCE({inp}->'messages', {inp}->'prompt', {inp}->'input')
                 ELSE {inp} END,
            CASE WHEN {oip} THEN {inp}->'outputs' END,
            {inp}
        FROM auditpipe_stage ON CONFLICT (id) DO NOTHING""",
        f"""INSERT INTO {s}.responses
            (id, model_name, model_version, "timestamp", parameters, outputs, raw_response)
        SELECT id,
            COALESCE(CASE WHEN {obj_out} THEN {out}->>'model_name' END, ev->>'model'),
            COALESCE(CASE WHEN {obj_out} THEN COALESCE({out}->>'model_version', {out}->>'model')
                          END,
                     substring(ev->>'endpoint' from '/versions/([^/]+)/')),
            to_timestamp((ts_ms + COALESCE((ev->>'latency_ms')::float8, 0)) / 1000.0),
            CASE WHEN {obj_out} AND jsonb_typeof({out}->'parameters') = 'object'
                 THEN {out}->'parameters' ELSE '{{}}'::jsonb END
            || jsonb_strip_nulls(jsonb_build_object(
                'status_code', ev->'status_code', 'stream', ev->'stream',
                'latency_ms', ev->'latency_ms', 'ttft_ms', ev->'ttft_ms', 'usage', ev->'usage')),
            CASE WHEN {obj_out}
                 THEN COALESCE({out}->'choices', {out}->'output', {out}->'outputs',
                               {out}->'text_output')
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


# ---------------------------------------------------------------------------------------------
# The fast path: binary COPY into the tables themselves
#
# Binary COPY: a signature, then per row a 16-bit field count and per field a 32-bit length
# (-1: NULL) and the value in the type's binary form: text is UTF-8, jsonb is a version byte
# (1) followed by the JSON text, timestamptz is 64-bit microseconds since 2000-01-01 UTC.

COPY_COLUMNS = {
    "requests": (
        'id, "timestamp", request_id, endpoint, model, parameters, inputs, outputs, raw_request'
    ),
    "responses": 'id, model_name, model_version, "timestamp", parameters, outputs, raw_response',
    "errors": "id, error, response",
    "metadata": "id, metadata",
}
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # + flags, header extension length
_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_LEN = struct.Struct("!i").pack
_TS = struct.Struct("!iq").pack  # length 8, value
_PG_EPOCH_SECS = 946684800  # 2000-01-01 in Unix seconds
_TS_MIN_MS, _TS_MAX_MS = -62135596800000, 253402300800000  # years 1 .. 9999
_INPUT_KEYS = ("messages", "prompt", "input")
_OIP_INPUT_KEYS = ("inputs", "text_input")  # infer, generate
_OUTPUT_KEYS = ("choices", "output", "outputs", "text_output")
_VERSION_SEGMENT = re.compile(r"/versions/([^/]+)/")
_RESPONSE_PARAMETERS = ("status_code", "stream", "latency_ms", "ttft_ms", "usage")


class _Unusual(Exception):
    """An event the fast path does not map exactly as the SQL would: use the staging path."""


def _text(value: Any) -> bytes:
    if value is None:
        return _NULL
    if type(value) is not str:
        raise _Unusual
    data = value.encode()
    return _LEN(len(data)) + data


def _jsonb(value: Any) -> bytes:
    data = orjson.dumps(value)
    return _LEN(len(data) + 1) + b"\x01" + data


def _timestamp(seconds: float) -> bytes:
    # As to_timestamp(float8) computes it: shift the epoch in float8, then round to microseconds.
    return _TS(8, round((seconds - _PG_EPOCH_SECS) * 1000000.0))


def _strip_nulls(value: Any) -> Any:
    """jsonb_strip_nulls: drop object fields whose value is null, at every depth."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _envelope(event: Event) -> dict[str, Any]:
    """The event without input and output (a copy and two deletions: 8x a comprehension)."""
    envelope = event.copy()
    envelope.pop("input", None)
    envelope.pop("output", None)
    return envelope


def _first_jsonb(value: dict[str, Any], keys: tuple[str, ...]) -> bytes:
    """The first of ``keys`` present in ``value``, as jsonb (COALESCE over ->): NULL if none."""
    for key in keys:
        if key in value:
            return _jsonb(value[key])
    return _NULL


def _first_str(value: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` whose value is not null, as ``->>`` reads it (COALESCE): only
    strings map exactly (a number would be text in SQL), others take the staging path."""
    for key in keys:
        item = value.get(key)
        if item is not None:
            if type(item) is not str:
                raise _Unusual
            return item
    return None


def _number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def _copy_rows(events: Sequence[Event]) -> dict[str, bytes]:
    """Binary COPY data for each table (tables without rows left out), built exactly as the
    staging path's SQL builds the rows. Raises :class:`_Unusual` for what it cannot map."""
    requests, responses, errors, metadata = [_SIGNATURE], [_SIGNATURE], [_SIGNATURE], [_SIGNATURE]
    for event in events:
        eid = event["event_id"]
        ts_ms = event["ts_ms"]
        if type(eid) is not str or type(ts_ms) is not int or not _TS_MIN_MS < ts_ms < _TS_MAX_MS:
            raise _Unusual
        eid_field = _text(eid)
        model = _text(event.get("model"))
        inp, out = event.get("input"), event.get("output")
        # requests
        outputs_requested = _NULL
        if inp is None:
            parameters = inputs = raw_request = _NULL
        else:
            raw_request = _jsonb(inp)
            if isinstance(inp, dict) and ("inputs" in inp or "text_input" in inp):  # OIP v2
                parameters = _first_jsonb(inp, ("parameters",))
                inputs = _first_jsonb(inp, _OIP_INPUT_KEYS)
                outputs_requested = _first_jsonb(inp, ("outputs",))
            elif isinstance(inp, dict):
                parameters = _jsonb({k: v for k, v in inp.items() if k not in _INPUT_KEYS})
                inputs = _first_jsonb(inp, _INPUT_KEYS)
            else:
                parameters, inputs = _NULL, raw_request
        requests.append(
            b"\x00\x09" + eid_field + _timestamp(ts_ms / 1000) + _text(event.get("request_id"))
            + _text(event.get("endpoint")) + model + parameters + inputs + outputs_requested
            + raw_request
        )  # fmt: skip
        # responses, when there is an output
        status = event.get("status_code")
        if status is not None and type(status) is not int:
            raise _Unusual
        raw_response = _NULL
        if out is not None:
            raw_response = _jsonb(out)
            latency = event.get("latency_ms")
            if latency is not None and not _number(latency):
                raise _Unusual
            params = _strip_nulls(
                {k: v for k in _RESPONSE_PARAMETERS if (v := event.get(k)) is not None}
            )
            name, version = model, None
            if isinstance(out, dict):
                if out.get("model_name") is not None:
                    name = _text(out["model_name"])
                version = _first_str(out, ("model_version", "model"))
                outputs = _first_jsonb(out, _OUTPUT_KEYS)
                if isinstance(out.get("parameters"), dict):
                    params = {**out["parameters"], **params}
            else:
                outputs = raw_response
            if version is None:
                endpoint = event.get("endpoint")
                found = _VERSION_SEGMENT.search(endpoint) if type(endpoint) is str else None
                version = found.group(1) if found else None
            responses.append(
                b"\x00\x07" + eid_field + name + _text(version)
                + _timestamp((ts_ms + float(latency or 0)) / 1000.0)
                + _jsonb(params) + outputs + raw_response
            )  # fmt: skip
        # errors: an error, or an HTTP status >= 400
        error = event.get("error")
        if error is not None or (status or 0) >= 400:
            kind = message = None
            if error is not None:
                if not isinstance(error, dict):
                    raise _Unusual
                kind, message = error.get("type"), error.get("message")
                if (kind is not None and type(kind) is not str) or (
                    message is not None and type(message) is not str
                ):
                    raise _Unusual
            if kind is not None and message is not None:
                text: str | None = f"{kind}: {message}"
            else:
                text = None if status is None else f"HTTP {status}"
            errors.append(b"\x00\x03" + eid_field + _text(text) + raw_response)
        # metadata: the rest of the event
        metadata.append(b"\x00\x02" + eid_field + _jsonb(_envelope(event)))
    tables = zip(COPY_COLUMNS, (requests, responses, errors, metadata), strict=True)
    return {table: b"".join(rows) + _TRAILER for table, rows in tables if len(rows) > 1}


# ---------------------------------------------------------------------------------------------
# The staging path (redelivery, unusual events)


def _json_field(value: Any) -> bytes:
    # orjson escapes control characters, so in COPY's text format only backslashes need doubling
    return b"\\N" if value is None else orjson.dumps(value).replace(b"\\", b"\\\\")


def _stage_row(event: Event) -> bytes:
    """One COPY text line: id, ts_ms, the envelope, input, output (split so that no staged
    value is large enough to be TOAST-compressed and decompressed again by every insert)."""
    envelope = _envelope(event)
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


class PostgresSink(Sink[PostgresConfig]):
    """COPY into a staging table, then insert-on-conflict-do-nothing into the four tables."""

    name = "postgres"

    def __init__(self, config: PostgresConfig | None = None) -> None:
        super().__init__(config)
        self._pool: Any = None
        self._retention: asyncio.Task[None] | None = None
        self._load = _load_sql(self.config.schema_name)
        self._dsn: str | None = None
        self._release: Callable[[], None] | None = None

    async def _conninfo(self) -> tuple[str, dict[str, Any]]:
        c = self.config
        if self._dsn is None:  # the configured database, or the embedded one (started)
            self._dsn, self._release = await asyncio.to_thread(acquire_dsn, c)
        assert self._dsn is not None
        return self._dsn, {
            "connect_timeout": max(1, int(c.connect_timeout_secs)),
            "options": f"-c statement_timeout={int(c.statement_timeout_secs * 1000)}",
            "application_name": "auditpipe-sink",
        }

    def _release_dsn(self) -> None:
        release, self._release, self._dsn = self._release, None, None
        if release is not None:
            release()

    async def migrate(self) -> None:
        """Create or upgrade the schema, tables and indexes (idempotent, additive)."""
        import psycopg

        dsn, kwargs = await self._conninfo()
        try:
            async with await psycopg.AsyncConnection.connect(dsn, **kwargs) as conn:
                await conn.execute(migration_sql(self.config.schema_name))
        except psycopg.OperationalError as exc:
            raise RetriableSinkError(
                f"postgres sink: cannot connect (sinks.postgres.dsn): {exc}"
            ) from exc
        finally:
            if self._pool is None:  # migrate alone (not started): let go of the embedded server
                await asyncio.to_thread(self._release_dsn)

    async def start(self) -> None:
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        if self.config.auto_migrate:
            await self.migrate()
        dsn, kwargs = await self._conninfo()
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
        await asyncio.to_thread(self._release_dsn)

    async def write(self, batch: Batch) -> None:

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
        try:
            rows: dict[str, bytes] | None = _copy_rows(events)
        except _Unusual:
            rows = None
        except (TypeError, ValueError) as exc:  # not serialisable as JSON (orjson's errors)
            raise PermanentSinkError(f"postgres sink: rejected: {exc}") from exc
        schema = f'"{self.config.schema_name}"'
        try:
            async with self._pool.connection() as conn:
                if rows is not None:
                    try:
                        async with conn.transaction():
                            for table, data in rows.items():
                                async with conn.cursor().copy(
                                    f"COPY {schema}.{table} ({COPY_COLUMNS[table]}) "
                                    "FROM STDIN (FORMAT BINARY)"
                                ) as copy:
                                    await copy.write(data)
                        return
                    except psycopg.errors.UniqueViolation:
                        pass  # some events are stored already (redelivery): the staging path
                await self._load_staged(conn, events)
        except PermanentSinkError:
            raise
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise PermanentSinkError(f"postgres sink: rejected: {exc}") from exc
        except (psycopg.Error, OSError) as exc:
            raise RetriableSinkError(f"postgres sink: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # pool timeout and the like
            raise RetriableSinkError(f"postgres sink: {type(exc).__name__}: {exc}") from exc

    async def _load_staged(self, conn: Any, events: Sequence[Event]) -> None:
        """COPY into a staging table, then insert-on-conflict-do-nothing into each table."""
        try:
            data = b"".join(_stage_row(e) for e in events)
        except (TypeError, ValueError) as exc:
            raise PermanentSinkError(f"postgres sink: rejected: {exc}") from exc
        async with conn.transaction():
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

    # -- erasure (auditpipe.privacy.erasure.Erasable) -----------------------------------------
    #
    # count/erase connect on their own (no start() needed: start() would also begin the
    # retention loop). A record is its row in ``requests``: deleting it removes the other
    # three tables' rows by cascade; the API's change-log rows about it (caller metadata before
    # and after an update) go too, its delete tombstones (no content) stay.

    erase_chunk_rows: int = 5000

    async def _erase_connection(self) -> Any:
        import psycopg

        dsn, kwargs = await self._conninfo()
        kwargs = {**kwargs, "application_name": "auditpipe-erase"}
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, **kwargs)

    async def count(self, selector: Selector) -> int:
        where, params = selector_sql(selector)
        s = f'"{self.config.schema_name}"'
        async with await self._erase_connection() as conn:
            cur = await conn.execute(
                f"SELECT count(*) FROM {s}.requests q LEFT JOIN {s}.metadata m ON m.id = q.id "
                f"WHERE {where}",
                params,
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def erase(self, selector: Selector) -> EraseResult:
        """Delete the selected records in committed chunks of ``erase_chunk_rows``."""
        from auditpipe.privacy.erasure import EraseResult

        where, params = selector_sql(selector)
        s = f'"{self.config.schema_name}"'
        result = EraseResult()
        params = {**params, "chunk": self.erase_chunk_rows}
        async with await self._erase_connection() as conn:
            while True:
                async with conn.transaction():
                    cur = await conn.execute(
                        f"""DELETE FROM {s}.requests WHERE id IN (
                                SELECT q.id FROM {s}.requests q
                                LEFT JOIN {s}.metadata m ON m.id = q.id
                                WHERE {where} LIMIT %(chunk)s)
                            RETURNING id""",
                        params,
                    )
                    ids = [row[0] for row in await cur.fetchall()]
                    if ids:
                        await conn.execute(
                            f"DELETE FROM {s}.{API_CHANGES_TABLE} "
                            "WHERE event_id = ANY(%s) AND action <> 'delete'",
                            (ids,),
                        )
                result.erased += len(ids)
                if len(ids) < self.erase_chunk_rows:
                    return result

    async def stop_erasure(self) -> None:
        await asyncio.to_thread(self._release_dsn)


def selector_sql(selector: Selector) -> tuple[str, dict[str, Any]]:
    """``selector`` as a condition on ``requests q LEFT JOIN metadata m`` and its parameters
    (the same records :meth:`Selector.matches` selects)."""
    where: list[str] = []
    params: dict[str, Any] = {}
    kind = selector.kind
    if kind in ("user", "tenant"):
        where.append(
            f"((m.metadata->>'{kind}') = %(value)s OR (m.metadata->'metadata'->>'{kind}') = "
            "%(value)s)"
        )
        params["value"] = selector.value
    elif kind == "request_id":
        where.append("q.request_id = %(value)s")
        params["value"] = selector.value
    elif kind == "event_id":
        where.append("q.id = %(value)s")
        params["value"] = selector.value
    elif kind == "metadata":
        where.append("(m.metadata->'metadata') @> %(pairs)s::jsonb")
        params["pairs"] = orjson.dumps(selector.metadata).decode()
    if selector.since_ms is not None:
        where.append('q."timestamp" >= to_timestamp(%(since_ms)s / 1000.0)')
        params["since_ms"] = selector.since_ms
    if selector.until_ms is not None:
        where.append('q."timestamp" < to_timestamp(%(until_ms)s / 1000.0)')
        params["until_ms"] = selector.until_ms
    return " AND ".join(where) or "TRUE", params
