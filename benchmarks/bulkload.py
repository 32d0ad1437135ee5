"""Fill the postgres sink's tables with N synthetic chat completions fast (generate_series).

Rows have the sink's layout (what ``PostgresSink`` writes for a chat completion of about 1.5 KB:
request with two messages, response with one choice and usage, the event envelope with
caller metadata), spread one second apart, in three models plus a rare one (1 in 1000), and
caller metadata ``team`` (10 values), ``user`` (1000 values) and ``ticket`` (unique), so
filters of every selectivity can be measured. Used by benchmarks/api_bench.py and the export
memory test.
"""

from __future__ import annotations

import time
from typing import Any

BASE_EPOCH = 1_764_547_200  # 2025-12-01T00:00:00Z


def bulk_load(conn: Any, schema: str, rows: int, start: int = 0, chunk: int = 100_000) -> float:
    """Insert ``rows`` records (numbered from ``start``) into ``schema``; seconds taken."""
    s = f'"{schema}"'
    started = time.monotonic()
    for lo in range(start, start + rows, chunk):
        hi = min(lo + chunk, start + rows) - 1
        params = {"lo": lo, "hi": hi, "base": BASE_EPOCH}
        sql = f"""
            CREATE TEMP TABLE bulk ON COMMIT DROP AS
            SELECT g, 'bulk-' || lpad(g::text, 10, '0') AS id,
                   to_timestamp(%(base)s + g) AS ts,
                   CASE WHEN g %% 1000 = 999 THEN 'rare-model'
                        ELSE (ARRAY['gpt-4o-mini', 'gpt-4o', 'llama-3-8b'])[1 + g %% 3] END AS model,
                   jsonb_build_object('team', 't' || (g %% 10), 'user', 'u' || (g %% 1000),
                                      'ticket', 'T-' || g) AS md
            FROM generate_series(%(lo)s::int, %(hi)s::int) g;
            INSERT INTO {s}.requests (id, "timestamp", request_id, endpoint, model, parameters,
                                      inputs, raw_request)
            SELECT id, ts, 'req-' || g, '/v1/chat/completions', model,
                   jsonb_build_object('model', model, 'store', true, 'metadata', md),
                   jsonb_build_array(
                       jsonb_build_object('role', 'system', 'content', 'You are a helpful assistant.'),
                       jsonb_build_object('role', 'user', 'content',
                                          'Question ' || g || ':' || repeat(' what about it?', 20))),
                   jsonb_build_object('model', model, 'store', true, 'metadata', md, 'messages',
                       jsonb_build_array(
                           jsonb_build_object('role', 'system', 'content', 'You are a helpful assistant.'),
                           jsonb_build_object('role', 'user', 'content',
                                              'Question ' || g || ':' || repeat(' what about it?', 20))))
            FROM bulk;
            INSERT INTO {s}.responses (id, model_name, model_version, "timestamp", parameters,
                                       outputs, raw_response)
            SELECT id, model, model, ts, '{{"status_code": 200}}'::jsonb, NULL,
                   jsonb_build_object('id', 'chatcmpl-bulk' || g, 'object', 'chat.completion',
                       'created', %(base)s + g, 'model', model,
                       'choices', jsonb_build_array(jsonb_build_object('index', 0,
                           'finish_reason', 'stop', 'message', jsonb_build_object(
                               'role', 'assistant', 'content',
                               'Answer ' || g || ':' || repeat(' it depends.', 40)))),
                       'usage', jsonb_build_object('prompt_tokens', 60, 'completion_tokens', 120,
                                                   'total_tokens', 180))
            FROM bulk;
            INSERT INTO {s}.metadata (id, metadata)
            SELECT id, jsonb_build_object('event_id', id, 'log_type', 'audit',
                       'ts_ms', (%(base)s + g)::bigint * 1000, 'request_id', 'req-' || g,
                       'endpoint', '/v1/chat/completions', 'method', 'POST', 'status_code', 200,
                       'model', model, 'store', true, 'stream', false, 'metadata', md,
                       'usage', jsonb_build_object('prompt_tokens', 60, 'completion_tokens', 120,
                                                   'total_tokens', 180),
                       'latency_ms', 350.0 + g %% 100, 'processing', '[]'::jsonb)
            FROM bulk;
            """  # noqa: E501
        for statement in filter(str.strip, sql.split(";")):
            conn.execute(statement, params)
        conn.commit()
    for table in ("requests", "responses", "metadata"):
        conn.execute(f"ANALYZE {s}.{table}")
    conn.commit()
    return time.monotonic() - started
