"""``auditpipe export``: stored records out as JSONL, streamed with constant memory.

Formats:

- ``chat`` (default): one ``{"messages": [...], "metadata": {...}}`` per stored chat
  completion, the request's messages followed by the assistant's answer (the first choice,
  null fields left out), plus ``"tools"`` when the request offered tools: OpenAI's chat
  fine-tuning and evals format. Only completions with an answer: errors and streams the
  client broke off (``incomplete``) are left out.
- ``records``: every matching record (any endpoint) as its audit event in the JSON rendering,
  rebuilt from the tables, with the caller metadata as served (API updates applied).

Both are built by PostgreSQL and read through a server-side cursor (``FETCH`` of
``batch_rows`` at a time), so memory does not grow with the number of rows; rows come in
capture order (time, then event id). Filters: ``model`` (the model the request named),
``metadata`` (containment: every pair must match), ``since`` (inclusive) and ``until``
(exclusive) on the capture time, ``limit``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from auditpipe.sinks.postgres import (
    CHAT_COMPLETIONS_PREDICATE,
    PostgresConfig,
    caller_metadata_sql,
    event_json_sql,
)

from .store import filter_conditions

PROGRESS_EVERY_SECS = 2.0


@dataclass
class ExportOptions:
    format: Literal["chat", "records"] = "chat"
    model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int | None = None
    batch_rows: int = 2000


@dataclass
class ExportReport:
    rows: int
    seconds: float

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return f"{self.rows} row(s) in {self.seconds:.1f}s ({rate:,.0f} rows/s)"


def export_sql(schema: str, options: ExportOptions) -> tuple[str, dict[str, Any]]:
    s = f'"{schema}"'
    caller = caller_metadata_sql("m")
    where: list[str] = []
    if options.format == "chat":
        message = "r.raw_response->'choices'->0->'message'"
        select = f"""(jsonb_build_object(
                'messages',
                CASE WHEN jsonb_typeof(q.raw_request->'messages') = 'array'
                     THEN q.raw_request->'messages' ELSE '[]'::jsonb END
                || jsonb_build_array(jsonb_strip_nulls({message})),
                'metadata', COALESCE({caller}, '{{}}'::jsonb))
            || CASE WHEN jsonb_typeof(q.raw_request->'tools') = 'array'
                    THEN jsonb_build_object('tools', q.raw_request->'tools')
                    ELSE '{{}}'::jsonb END)::text"""
        source = (
            f"{s}.requests q JOIN {s}.responses r ON r.id = q.id JOIN {s}.metadata m ON m.id = q.id"
        )
        where += [
            CHAT_COMPLETIONS_PREDICATE,
            f"jsonb_typeof({message}) = 'object'",
            "COALESCE(m.metadata->>'incomplete', 'false') <> 'true'",
            "COALESCE((m.metadata->>'status_code')::int, 200) < 400",
        ]
    else:
        select = f"{event_json_sql()}::text"
        source = (
            f"{s}.requests q JOIN {s}.metadata m ON m.id = q.id "
            f"LEFT JOIN {s}.responses r ON r.id = q.id"
        )
    conditions, params = filter_conditions(
        options.model, options.metadata, options.since, options.until
    )
    where += conditions
    sql = f"SELECT {select} FROM {source}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += ' ORDER BY q."timestamp", q.id'
    if options.limit is not None:
        sql += " LIMIT %(limit)s"
        params["limit"] = options.limit
    return sql, params


def run_export(
    dsn: str,
    config: PostgresConfig,
    options: ExportOptions,
    out: BinaryIO,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write the matching rows to ``out`` as JSONL; report the count and time."""
    import psycopg
    from psycopg.adapt import Loader

    class _Bytes(Loader):  # the JSON text as PostgreSQL sends it: no decode and re-encode
        def load(self, data: Any) -> bytes:
            return bytes(data)

    sql, params = export_sql(config.schema_name, options)
    started = time.monotonic()
    rows = 0
    next_report = started + PROGRESS_EVERY_SECS
    with psycopg.connect(
        dsn, application_name="auditpipe-export",
        connect_timeout=max(1, int(config.connect_timeout_secs)),
    ) as conn:  # fmt: skip
        conn.adapters.register_loader("text", _Bytes)
        with conn.cursor(name="auditpipe_export") as cur:
            cur.itersize = options.batch_rows
            cur.execute(sql, params)
            while batch := cur.fetchmany(options.batch_rows):
                out.write(b"".join(row[0] + b"\n" for row in batch))
                rows += len(batch)
                now = time.monotonic()
                if progress is not None and now >= next_report:
                    progress(f"{rows} rows ({rows / (now - started):,.0f} rows/s)")
                    next_report = now + PROGRESS_EVERY_SECS
    out.flush()
    return ExportReport(rows, time.monotonic() - started)
