"""Reading (and the API's two writes to) the PostgreSQL sink's tables.

Served ids. A chat completion is served under the id its client saw, the stored response's
``id`` (``chatcmpl-...``), looked up through the ``responses_completion_id_idx`` expression
index. Records without one are served under their event id. When several records carry the
same completion id (a server that reuses ids, the same answer captured twice), the earliest
keeps it and the later ones are served under their event ids, so every served id names one
record and pagination cursors are unambiguous; a deleted completion id stays deleted (its
tombstone in ``api_changes`` keeps a later duplicate from taking the id over). Any record can
also be fetched by its event id.

Order and cursors. Listing is ordered by the record's time (``requests.timestamp``, the
capture time of the request) then event id, and ``after`` is a keyset cursor on that pair,
read through the partial indexes ``requests_chat_created_idx`` / ``..._model_created_idx``;
a cursor naming a completion deleted meanwhile still works (its position is kept in the
tombstone).

Writes. ``update_metadata`` and ``delete_completion`` change the record and append a row to
``api_changes`` (who, when, which record, before/after, and the change as an AuditEvent) in
one transaction: a change is never applied without its record. ``delete_completion`` is the
one place a record is deleted; pass another function as ``deleter`` to
:func:`auditpipe.api.app.create_app` to route deletes elsewhere (an erasure across stores).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from auditpipe.schemas import new_event
from auditpipe.sinks.postgres import (
    API_CHANGES_TABLE,
    CHAT_COMPLETIONS_PREDICATE,
    PostgresConfig,
    caller_metadata_sql,
    completion_id_sql,
)

from auditpipe.settings import ServeSettings

CHAT_WITH_ANSWER = f"{CHAT_COMPLETIONS_PREDICATE} AND r.raw_response ? 'choices'"


@dataclass
class Record:
    """One stored chat completion as the API serves it."""

    event_id: str
    timestamp: dt.datetime
    model: str | None
    request: Any
    response: Any
    caller_metadata: dict[str, str]
    envelope: dict[str, Any]
    served_id: str


@dataclass
class Change:
    """Who asks for a change, for the change log."""

    actor: str
    client: str | None = None
    request_id: str | None = None


@dataclass
class RecordFilter:
    """The viewer's filters (all optional)."""

    model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    status: str | None = None  # "ok" | "error" | an HTTP status code
    text: str | None = None
    endpoint: str | None = None


def _served_id_sql(schema: str, p: str = "p") -> str:
    cid = f"({p}.raw_response->>'id')"
    return f"""CASE
        WHEN COALESCE({cid}, '') = '' THEN {p}.id
        WHEN EXISTS (SELECT 1 FROM {schema}.responses d
                     WHERE (d.raw_response->>'id') = {cid} AND d.id < {p}.id)
          OR EXISTS (SELECT 1 FROM {schema}.{API_CHANGES_TABLE} c
                     WHERE c.completion_id = {cid} AND c.action = 'delete'
                       AND c.event_id < {p}.id)
        THEN {p}.id ELSE {cid} END"""


def filter_conditions(
    model: str | None = None,
    metadata: dict[str, str] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """SQL conditions (aliases ``q`` requests, ``m`` metadata) and their parameters for the
    filters every reader offers: the request's model, caller metadata containment (every pair
    must match), capture time since (inclusive) and until (exclusive)."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if model:
        where.append("q.model = %(model)s")
        params["model"] = model
    if metadata:
        where.append(f"{caller_metadata_sql('m')} @> %(metadata)s::jsonb")
        params["metadata"] = orjson.dumps(metadata).decode()
    if since is not None:
        where.append('q."timestamp" >= %(since)s')
        params["since"] = since
    if until is not None:
        where.append('q."timestamp" < %(until)s')
        params["until"] = until
    return where, params


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Store:
    """An async connection pool on the sink's database and the queries the server runs."""

    def __init__(self, config: PostgresConfig, serve: ServeSettings, dsn: str) -> None:
        self.config = config
        self.serve = serve
        self.dsn = dsn
        self.s = f'"{config.schema_name}"'
        self._pool: Any = None
        s = self.s
        self._columns = (
            f'q.id, q."timestamp", q.model, q.raw_request, r.raw_response, '
            f"{caller_metadata_sql('m')} AS caller_metadata, m.metadata AS envelope"
        )
        self._from = (
            f"{s}.requests q JOIN {s}.responses r ON r.id = q.id JOIN {s}.metadata m ON m.id = q.id"
        )

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        async def configure(conn: Any) -> None:
            from psycopg.types.json import set_json_loads

            set_json_loads(orjson.loads, conn)

        timeout_ms = int(self.serve.statement_timeout_secs * 1000)
        self._pool = AsyncConnectionPool(
            self.dsn, min_size=1, max_size=self.serve.pool_max_size, open=False,
            configure=configure, timeout=self.config.connect_timeout_secs,
            kwargs={"application_name": "auditpipe-serve",
                    "connect_timeout": max(1, int(self.config.connect_timeout_secs)),
                    "options": f"-c statement_timeout={timeout_ms}",
                    # a plan per query, made for its values: one generic (prepared) plan
                    # cannot tell a metadata filter matching one row from one matching many
                    "prepare_threshold": None},
        )  # fmt: skip
        await self._pool.open(wait=True, timeout=self.config.connect_timeout_secs)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1")

    # -- chat completions --------------------------------------------------------------------

    def _record(self, row: Sequence[Any]) -> Record:
        eid, ts, model, request, response, caller, envelope, served = row
        return Record(eid, ts, model, request, response, caller or {}, envelope or {}, served)

    async def list_completions(
        self,
        *,
        model: str | None,
        metadata: dict[str, str],
        after: str | None,
        limit: int,
        descending: bool,
    ) -> tuple[list[Record], bool]:
        """A page of chat completions and whether more follow. ``after`` must resolve
        (raise :class:`LookupError` otherwise)."""
        where, params = filter_conditions(model, metadata)
        where.insert(0, CHAT_WITH_ANSWER)
        params["limit"] = limit + 1
        async with self._pool.connection() as conn:
            if after is not None:
                position = await self._position(conn, after)
                if position is None:
                    raise LookupError(after)
                params["ts"], params["eid"] = position
                op = "<" if descending else ">"
                where.append(f'(q."timestamp", q.id) {op} (%(ts)s, %(eid)s)')
            direction = "DESC" if descending else "ASC"
            sql = f"""
                WITH p AS (
                    SELECT {self._columns} FROM {self._from}
                    WHERE {" AND ".join(where)}
                    ORDER BY q."timestamp" {direction}, q.id {direction}
                    LIMIT %(limit)s
                )
                SELECT p.*, {_served_id_sql(self.s)} FROM p
                ORDER BY p."timestamp" {direction}, p.id {direction}"""
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
        records = [self._record(r) for r in rows]
        return records[:limit], len(records) > limit

    async def _candidates(self, conn: Any, ref: str, lock: bool = False) -> list[Record]:
        s = self.s
        sql = f"""
            WITH hits AS (
                SELECT id FROM {s}.responses WHERE {completion_id_sql("responses")} = %(ref)s
                UNION SELECT id FROM {s}.requests WHERE id = %(ref)s
            ), p AS (
                SELECT {self._columns} FROM hits JOIN {self._from} ON q.id = hits.id
                WHERE {CHAT_WITH_ANSWER}
            )
            SELECT p.*, {_served_id_sql(s)} FROM p ORDER BY p.id"""
        cur = await conn.execute(sql, {"ref": ref})
        return [self._record(r) for r in await cur.fetchall()]

    async def _find(self, conn: Any, ref: str) -> Record | None:
        candidates = await self._candidates(conn, ref)
        for rec in candidates:
            if rec.served_id == ref:
                return rec
        for rec in candidates:
            if rec.event_id == ref:
                return rec
        return None

    async def _position(self, conn: Any, ref: str) -> tuple[dt.datetime, str] | None:
        rec = await self._find(conn, ref)
        if rec is not None:
            return rec.timestamp, rec.event_id
        cur = await conn.execute(
            f"SELECT record_timestamp, event_id FROM {self.s}.{API_CHANGES_TABLE} "
            "WHERE action = 'delete' AND (completion_id = %(ref)s OR event_id = %(ref)s) "
            'AND record_timestamp IS NOT NULL ORDER BY "timestamp" DESC LIMIT 1',
            {"ref": ref},
        )
        row = await cur.fetchone()
        return (row[0], row[1]) if row else None

    async def get_completion(self, ref: str) -> Record | None:
        async with self._pool.connection() as conn:
            return await self._find(conn, ref)

    async def update_metadata(
        self, ref: str, metadata: dict[str, str], change: Change
    ) -> Record | None:
        """Set the caller metadata of a completion and log the change, in one transaction."""
        async with self._pool.connection() as conn, conn.transaction():
            rec = await self._find(conn, ref)
            if rec is None:
                return None
            cur = await conn.execute(
                f"UPDATE {self.s}.metadata SET api_metadata = %s::jsonb WHERE id = %s",
                (orjson.dumps(metadata).decode(), rec.event_id),
            )
            if cur.rowcount != 1:
                return None  # deleted meanwhile
            await self._log_change(conn, "update_metadata", rec, change, rec.caller_metadata,
                                   metadata, method="POST")  # fmt: skip
            rec.caller_metadata = metadata
            return rec

    async def _log_change(
        self,
        conn: Any,
        action: str,
        rec: Record,
        change: Change,
        before: Any,
        after: Any,
        method: str,
    ) -> None:
        event = new_event(
            endpoint=f"/v1/chat/completions/{rec.served_id}",
            method=method,
            status_code=200,
            model=rec.model,
            metadata={
                "action": action, "completion_id": rec.served_id,
                "record_event_id": rec.event_id, "actor": change.actor,
            },
            headers={"x-request-id": change.request_id} if change.request_id else {},
            source={"service": "auditpipe-serve", "instance": None},
        )  # fmt: skip
        if change.request_id:
            event["request_id"] = change.request_id
        await conn.execute(
            f"""INSERT INTO {self.s}.{API_CHANGES_TABLE}
                (id, "timestamp", action, completion_id, event_id, record_timestamp, actor,
                 client, before, after, event)
            VALUES (%s, to_timestamp(%s / 1000.0), %s, %s, %s, %s, %s, %s,
                    %s::jsonb, %s::jsonb, %s::jsonb)""",
            (
                event["event_id"], event["ts_ms"], action, rec.served_id, rec.event_id,
                rec.timestamp, change.actor, change.client,
                None if before is None else orjson.dumps(before).decode(),
                None if after is None else orjson.dumps(after).decode(),
                orjson.dumps(event).decode(),
            ),
        )  # fmt: skip

    # -- the viewer ---------------------------------------------------------------------------

    async def list_records(
        self, flt: RecordFilter, *, older_than: str | None, newer_than: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """Records of any kind, newest first, keyset-paged; (rows, more in that direction)."""
        s = self.s
        where, params = filter_conditions(flt.model, flt.metadata, flt.since, flt.until)
        params["limit"] = limit + 1
        caller = caller_metadata_sql("m")
        if flt.endpoint:
            where.append("q.endpoint = %(endpoint)s")
            params["endpoint"] = flt.endpoint
        if flt.status == "ok":
            where.append("e.id IS NULL")
        elif flt.status == "error":
            where.append("e.id IS NOT NULL")
        elif flt.status:
            where.append("(m.metadata->>'status_code') = %(status)s")
            params["status"] = flt.status
        if flt.text:
            where.append("(q.inputs::text ILIKE %(text)s OR r.raw_response::text ILIKE %(text)s)")
            params["text"] = f"%{escape_like(flt.text)}%"
        descending = True
        async with self._pool.connection() as conn:
            for ref, op, desc in ((older_than, "<", True), (newer_than, ">", False)):
                if ref:
                    cur = await conn.execute(
                        f'SELECT "timestamp", id FROM {s}.requests WHERE id = %s', (ref,)
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        params["ts"], params["eid"] = row
                        where.append(f'(q."timestamp", q.id) {op} (%(ts)s, %(eid)s)')
                        descending = desc
                    break
            direction = "DESC" if descending else "ASC"
            sql = f"""
                SELECT q.id, q."timestamp", q.endpoint, q.model, q.inputs, r.raw_response,
                       {caller} AS caller_metadata, m.metadata->'status_code',
                       m.metadata->'latency_ms', m.metadata->'usage', m.metadata->'cost',
                       e.error, COALESCE((m.metadata->>'incomplete')::boolean, false),
                       jsonb_array_length(COALESCE(m.metadata->'processing', '[]'::jsonb))
                FROM {s}.requests q JOIN {s}.metadata m ON m.id = q.id
                LEFT JOIN {s}.responses r ON r.id = q.id LEFT JOIN {s}.errors e ON e.id = q.id
                {"WHERE " + " AND ".join(where) if where else ""}
                ORDER BY q."timestamp" {direction}, q.id {direction} LIMIT %(limit)s"""
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
        keys = ("event_id", "timestamp", "endpoint", "model", "inputs", "response",
                "caller_metadata", "status_code", "latency_ms", "usage", "cost", "error",
                "incomplete", "steps")  # fmt: skip
        records = [dict(zip(keys, row, strict=True)) for row in rows]
        more = len(records) > limit
        records = records[:limit]
        if not descending:
            records.reverse()
        return records, more

    async def get_record(self, event_id: str) -> dict[str, Any] | None:
        """Everything stored about one record, plus its served id and API changes."""
        s = self.s
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"""SELECT q.id, q."timestamp", q.endpoint, q.model, q.raw_request,
                           r.raw_response, {caller_metadata_sql("m")}, m.metadata, e.error
                    FROM {s}.requests q JOIN {s}.metadata m ON m.id = q.id
                    LEFT JOIN {s}.responses r ON r.id = q.id
                    LEFT JOIN {s}.errors e ON e.id = q.id WHERE q.id = %s""",
                (event_id,),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            keys = ("event_id", "timestamp", "endpoint", "model", "request", "response",
                    "caller_metadata", "envelope", "error")  # fmt: skip
            record = dict(zip(keys, row, strict=True))
            record["served_id"] = None
            for rec in await self._candidates(conn, event_id):
                record["served_id"] = rec.served_id
            record["changes"] = await self._changes(conn, "WHERE event_id = %s", (event_id,))
        return record

    async def list_changes(self, limit: int = 200) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            return await self._changes(conn, "", (), limit)

    async def _changes(
        self, conn: Any, where: str, params: tuple[Any, ...], limit: int = 1000
    ) -> list[dict[str, Any]]:
        cur = await conn.execute(
            f"""SELECT id, "timestamp", action, completion_id, event_id, actor, client,
                       before, after
                FROM {self.s}.{API_CHANGES_TABLE} {where}
                ORDER BY "timestamp" DESC, id DESC LIMIT {int(limit)}""",
            params,
        )
        keys = ("id", "timestamp", "action", "completion_id", "event_id", "actor", "client",
                "before", "after")  # fmt: skip
        return [dict(zip(keys, row, strict=True)) for row in await cur.fetchall()]


async def delete_completion(store: Store, ref: str, change: Change) -> Record | None:
    """Delete a completion's record (every row of it, by cascade) and log the deletion, in one
    transaction; None when no completion is served under ``ref``. The server's default
    ``deleter``."""
    async with store._pool.connection() as conn, conn.transaction():
        rec = await store._find(conn, ref)
        if rec is None:
            return None
        cur = await conn.execute(f"DELETE FROM {store.s}.requests WHERE id = %s", (rec.event_id,))
        if cur.rowcount != 1:
            return None
        await store._log_change(conn, "delete", rec, change, None, None, method="DELETE")
        return rec
