"""The web viewer: server-rendered HTML over the stored records (read only).

``/`` lists records of every kind (chat, embeddings, errors...), newest first, with filters
(model, metadata ``K=V``, time since/until in the forms ``auditpipe export`` takes, status
``ok`` / ``error`` / a code, text search in the request and the response) and keyset
pagination (older / newer). ``/records/{event_id}`` shows one record: messages, answer, usage,
cost, latency, metadata, the ``processing`` lineage, the API changes made to it and the raw
record. ``/changes`` lists the updates and deletes made through the API.

Stored text is untrusted: everything is HTML-escaped (``html.escape``) before it is placed in
a page, and redaction markers (``[REDACTED:EMAIL]``, ``[EMAIL:1f0c...]`` hashes,
``…[TRUNCATED:EMAIL]``) are then wrapped in ``<mark class="redacted">`` so a reader sees
what the redact step replaced. Browsers authenticate with HTTP Basic (the API key as the
password) or a bearer header; see ``auth.py``.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from .auth import KeyRing
from .store import RecordFilter, Store
from .timeparse import TimeParseError, parse_time

MARKER = re.compile(r"\[(?:REDACTED|TRUNCATED):[A-Z0-9_]+\]|\[[A-Z][A-Z0-9_]*:[0-9a-f]{16}\]")
SNIPPET_CHARS = 140

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;
background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}header .brand{font-size:16px}
main{padding:16px 20px;max-width:1400px}
form.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:end;background:#fff;padding:12px;
border:1px solid #d0d7de;border-radius:6px;margin-bottom:12px}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#57606a}
form.filters input,form.filters select{font:inherit;padding:4px 6px;border:1px solid #d0d7de;
border-radius:4px}
button{font:inherit;padding:5px 12px;border-radius:4px;border:1px solid #1f883d;background:#1f883d;
color:#fff;cursor:pointer}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-size:12px;color:#57606a}
td.num{text-align:right;white-space:nowrap}td.time{white-space:nowrap;font-size:12px}
.snip{color:#57606a;font-size:12px;max-width:420px;overflow-wrap:anywhere}
.status-ok{color:#1a7f37;font-weight:600}.status-error{color:#cf222e;font-weight:600}
mark.redacted{background:#ffd8b5;color:#8a3b00;border:1px solid #fb8f44;border-radius:3px;
padding:0 2px;font-family:ui-monospace,monospace;font-size:.92em}
.pager{display:flex;gap:16px;margin:12px 0}
.msg{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:8px 0}
.msg .role{font-size:12px;font-weight:600;padding:4px 10px;border-bottom:1px solid #eaeef2;
background:#f6f8fa;text-transform:uppercase;letter-spacing:.04em}
.msg.assistant .role{background:#ddf4ff}.msg .body{padding:8px 10px;white-space:pre-wrap;
overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#fff;border:1px solid #d0d7de;
padding:8px;border-radius:6px;font-size:12px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;background:#fff;
border:1px solid #d0d7de;border-radius:6px;padding:10px}
dl.facts dt{color:#57606a}dl.facts dd{margin:0;overflow-wrap:anywhere}
h2{font-size:16px;margin:20px 0 6px}.empty{color:#57606a;padding:16px}
.tag{display:inline-block;background:#eaeef2;border-radius:10px;padding:0 8px;margin:1px;
font-size:12px}
"""


def esc(value: Any) -> str:
    """Escape for HTML, then mark redaction markers (they contain no HTML-special chars)."""
    text = html.escape("" if value is None else str(value), quote=True)
    return MARKER.sub(lambda m: f'<mark class="redacted">{m.group(0)}</mark>', text)


def _json(value: Any) -> str:
    return esc(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _time(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, dict):
                parts.append(f"[{p.get('type', 'part')}]")
        return " ".join(parts)
    return "" if content is None else orjson.dumps(content).decode()


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def _prompt_snippet(inputs: Any) -> str:
    if isinstance(inputs, list):
        users = [m for m in inputs if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1] if users else (inputs[-1] if inputs else None)
        return _snippet(_text(last.get("content")) if isinstance(last, dict) else _text(last))
    return _snippet(_text(inputs))


def _answer_snippet(response: Any) -> str:
    if not isinstance(response, dict):
        return ""
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        if isinstance(message, dict):
            if message.get("content"):
                return _snippet(_text(message["content"]))
            calls = message.get("tool_calls") or []
            names = [((c or {}).get("function") or {}).get("name") for c in calls]
            if names:
                return "tool call: " + ", ".join(str(n) for n in names)
        text = choices[0].get("text")
        if isinstance(text, str):
            return _snippet(text)
    if "data" in response and response.get("object") == "list":
        return f"{len(response.get('data') or [])} item(s)"
    return ""


def _status(code: Any, error: Any) -> str:
    if error or (isinstance(code, int) and code >= 400):
        return f'<span class="status-error">{esc(code if code is not None else "error")}</span>'
    return f'<span class="status-ok">{esc(code if code is not None else "ok")}</span>'


def _usage(usage: Any) -> str:
    if not isinstance(usage, dict):
        return ""
    total = usage.get("total_tokens")
    return esc(total) if total is not None else ""


def _cost(cost: Any) -> str:
    if not isinstance(cost, dict) or cost.get("total_usd") is None:
        return ""
    approx = "~" if cost.get("estimated") else ""
    return f"{approx}${cost['total_usd']:.6f}"


def _latency(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return ""
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · auditpipe</title><style>{CSS}</style></head><body>
<header><a class="brand" href="/">auditpipe</a><a href="/">Records</a>
<a href="/changes">API changes</a></header><main>{body}</main></body></html>""",
        status_code=status,
    )


async def error_page(request: Request, status: int) -> Response:
    message = "Not found" if status == 404 else f"HTTP {status}"
    return page(message, f'<h1>{esc(message)}</h1><p><a href="/">Back to the records</a></p>',
                status)  # fmt: skip


def _parse_metadata(values: list[str]) -> tuple[dict[str, str], list[str]]:
    out, bad = {}, []
    for raw in values:
        for item in raw.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                bad.append(item)
            else:
                out[key.strip()] = value.strip()
    return out, bad


class Viewer:
    def __init__(self, store: Store, keys: KeyRing, page_size: int) -> None:
        self.store, self.keys, self.page_size = store, keys, page_size

    def routes(self) -> list[Route]:
        return [
            Route("/", self.guard(self.index), methods=["GET"]),
            Route("/records/{event_id:path}", self.guard(self.record), methods=["GET"]),
            Route("/changes", self.guard(self.changes), methods=["GET"]),
        ]

    def guard(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if self.keys.authenticate(request.headers.get("authorization")) is None:
                return HTMLResponse(
                    "<h1>401: an API key is needed</h1><p>Sign in with any user name and an "
                    "API key from [serve] api_keys or read_api_keys as the password.</p>",
                    status_code=401,
                    headers={"www-authenticate": 'Basic realm="auditpipe", charset="UTF-8"'},
                )
            response: Response = await handler(request)
            response.headers["x-frame-options"] = "DENY"
            response.headers["content-security-policy"] = (
                "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'"
            )
            response.headers["referrer-policy"] = "no-referrer"
            return response

        return endpoint

    async def index(self, request: Request) -> Response:
        qp = request.query_params
        problems: list[str] = []
        metadata, bad = _parse_metadata(qp.getlist("metadata"))
        problems += [f"metadata: {b!r} is not KEY=VALUE" for b in bad]
        times: dict[str, dt.datetime | None] = {"since": None, "until": None}
        for name in times:
            if qp.get(name):
                try:
                    times[name] = parse_time(qp[name])
                except TimeParseError as exc:
                    problems.append(f"{name}: {exc}")
        status = (qp.get("status") or "").strip() or None
        if status and status not in ("ok", "error") and not status.isdigit():
            problems.append(f"status: {status!r} is not ok, error or an HTTP code")
            status = None
        flt = RecordFilter(
            model=(qp.get("model") or "").strip() or None,
            metadata=metadata,
            since=times["since"],
            until=times["until"],
            status=status,
            text=(qp.get("q") or "").strip() or None,
        )
        older, newer = qp.get("older_than"), qp.get("newer_than")
        records, more = await self.store.list_records(
            flt, older_than=older, newer_than=newer, limit=self.page_size
        )
        keep = [(k, v) for k, v in qp.multi_items() if k not in ("older_than", "newer_than") and v]
        body = self._filters(qp) + self._problems(problems) + self._table(records)
        return page("Records", body + self._pager(records, more, older, newer, keep))

    @staticmethod
    def _problems(problems: list[str]) -> str:
        if not problems:
            return ""
        items = "".join(f"<li>{esc(p)}</li>" for p in problems)
        return f'<div class="status-error" role="alert"><ul>{items}</ul></div>'

    @staticmethod
    def _filters(qp: Any) -> str:
        def field(name: str, label: str, placeholder: str, width: int = 140) -> str:
            value = esc(", ".join(qp.getlist(name)) if name == "metadata" else qp.get(name, ""))
            return (
                f'<label>{label}<input name="{name}" value="{value}" '
                f'placeholder="{esc(placeholder)}" style="width:{width}px"></label>'
            )

        status = qp.get("status", "")
        options = "".join(
            f'<option value="{v}"{" selected" if status == v else ""}>{t}</option>'
            for v, t in (("", "any"), ("ok", "ok"), ("error", "error"))
        )
        return (
            '<form class="filters" method="get" action="/">'
            + field("model", "Model", "gpt-4o-mini")
            + field("metadata", "Metadata", "key=value, key2=value2", 200)
            + field("since", "Since", "24h or 2026-12-01", 130)
            + field("until", "Until", "2026-12-02T12:00Z", 130)
            + f'<label>Status<select name="status">{options}</select></label>'
            + field("q", "Text", "search request and response", 200)
            + '<button type="submit">Filter</button> <a href="/">clear</a></form>'
        )

    @staticmethod
    def _table(records: list[dict[str, Any]]) -> str:
        if not records:
            return '<p class="empty">No records match.</p>'
        rows = []
        for r in records:
            link = "/records/" + esc(r["event_id"])
            tags = "".join(
                f'<span class="tag">{esc(k)}={esc(v)}</span>'
                for k, v in sorted((r["caller_metadata"] or {}).items())[:4]
            )
            incomplete = ' <span class="tag">incomplete</span>' if r["incomplete"] else ""
            rows.append(
                f'<tr class="record"><td class="time"><a href="{link}">{_time(r["timestamp"])}</a>'
                f"</td><td>{esc(r['model'])}</td><td>{esc(r['endpoint'])}</td>"
                f"<td>{_status(r['status_code'], r['error'])}{incomplete}</td>"
                f'<td class="num">{_latency(r["latency_ms"])}</td>'
                f'<td class="num">{_usage(r["usage"])}</td><td class="num">{_cost(r["cost"])}</td>'
                f'<td class="snip">{esc(_prompt_snippet(r["inputs"]))}</td>'
                f'<td class="snip">{esc(_answer_snippet(r["response"]))}</td><td>{tags}</td></tr>'
            )
        head = (
            "<tr><th>Time</th><th>Model</th><th>Endpoint</th><th>Status</th><th>Latency</th>"
            "<th>Tokens</th><th>Cost</th><th>Prompt</th><th>Answer</th><th>Metadata</th></tr>"
        )
        return f'<table id="records"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'

    @staticmethod
    def _pager(
        records: list[dict[str, Any]],
        more: bool,
        older: str | None,
        newer: str | None,
        keep: list[tuple[str, str]],
    ) -> str:
        if not records:
            return ""
        links = []
        # newest first: a page reached going older has newer records; one going newer, if more
        if older or (newer and more):
            q = urlencode([*keep, ("newer_than", records[0]["event_id"])])
            links.append(f'<a rel="prev" href="/?{esc(q)}">← Newer</a>')
        if (more and not newer) or newer:
            q = urlencode([*keep, ("older_than", records[-1]["event_id"])])
            links.append(f'<a rel="next" href="/?{esc(q)}">Older →</a>')
        return f'<nav class="pager">{"".join(links)}</nav>'

    async def record(self, request: Request) -> Response:
        event_id = request.path_params["event_id"]
        rec = await self.store.get_record(event_id)
        if rec is None:
            return await error_page(request, 404)
        env = rec["envelope"] or {}
        request_body, response = rec["request"], rec["response"]
        parts = [f"<h1>{esc(rec['served_id'] or rec['event_id'])}</h1>", self._facts(rec, env)]
        parts.append(self._metadata(rec, env))
        if isinstance(request_body, dict) and isinstance(request_body.get("messages"), list):
            parts.append("<h2>Messages</h2>" + "".join(
                self._message(m) for m in request_body["messages"]))  # fmt: skip
        elif request_body is not None:
            parts.append(f"<h2>Input</h2><pre>{_json(request_body)}</pre>")
        parts.append(self._answer(response))
        parts.append(self._lineage(env.get("processing")))
        if rec["error"]:
            parts.append(f'<h2>Error</h2><pre class="status-error">{esc(rec["error"])}</pre>')
        parts.append(self._changes_table(rec["changes"], "Changes made through the API"))
        event = {**env, "input": request_body, "output": response}
        parts.append(f"<details><summary>Raw record</summary><pre>{_json(event)}</pre></details>")
        return page(str(rec["served_id"] or event_id), "".join(parts))

    @staticmethod
    def _facts(rec: dict[str, Any], env: dict[str, Any]) -> str:
        usage = env.get("usage") or {}
        cost = env.get("cost") or {}
        response = rec["response"] if isinstance(rec["response"], dict) else {}
        facts: list[tuple[str, str]] = [
            ("Event id", esc(rec["event_id"])),
            ("Served as", esc(rec["served_id"]) if rec["served_id"] else "—"),
            ("Request id", esc(env.get("request_id"))),
            ("Time", _time(rec["timestamp"])),
            ("Endpoint", f'{esc(env.get("method"))} {esc(rec["endpoint"])}'),
            ("Status", _status(env.get("status_code"), rec["error"])),
            ("Model", esc(rec["model"]) + (
                f' (answered by {esc(response["model"])})'
                if response.get("model") and response.get("model") != rec["model"] else "")),
            ("Latency", _latency(env.get("latency_ms"))
             + (f', first token {_latency(env.get("ttft_ms"))}' if env.get("ttft_ms") else "")),
            ("Usage", esc(", ".join(f"{k} {v}" for k, v in usage.items() if v is not None))
             + (" (estimated)" if env.get("usage_estimated") else "")),
            ("Cost", esc(", ".join(f"{k} ${v:.6f}" for k, v in cost.items()
                                   if isinstance(v, int | float) and not isinstance(v, bool)))
             + (" (estimated)" if cost.get("estimated") else "")),
            ("Stream", esc(env.get("stream")) + (
                f', {esc(env.get("chunk_count"))} chunks' if env.get("chunk_count") else "")
             + (" — incomplete" if env.get("incomplete") else "")
             + (" — truncated" if env.get("truncated") else "")),
            ("Tenant / user", f'{esc(env.get("tenant") or "—")} / {esc(env.get("user") or "—")}'),
            ("Trace", esc(env.get("trace_id") or "—")),
            ("Source", esc(" ".join(str(v) for v in (env.get("source") or {}).values() if v))),
        ]  # fmt: skip
        items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
        return f'<dl class="facts" id="facts">{items}</dl>'

    @staticmethod
    def _metadata(rec: dict[str, Any], env: dict[str, Any]) -> str:
        current = rec["caller_metadata"] or {}
        captured = env.get("metadata") or {}
        rows = (
            "".join(
                f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in sorted(current.items())
            )
            or '<tr><td colspan="2" class="empty">none</td></tr>'
        )
        note = ""
        if current != captured:
            note = f"<p>Changed through the API; as captured: <code>{esc(captured)}</code></p>"
        return f'<h2>Metadata</h2><table id="metadata">{rows}</table>{note}'

    @staticmethod
    def _message(m: Any) -> str:
        if not isinstance(m, dict):
            return f'<div class="msg"><div class="body">{esc(_text(m))}</div></div>'
        role = str(m.get("role") or "?")
        body = esc(_text(m.get("content")))
        extra = {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}
        if extra:
            body += f"<pre>{_json(extra)}</pre>"
        cls = "assistant" if role == "assistant" else ""
        return f'<div class="msg {cls}"><div class="role">{esc(role)}</div>' \
               f'<div class="body">{body}</div></div>'  # fmt: skip

    def _answer(self, response: Any) -> str:
        if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
            if response is None:
                return ""
            return f"<h2>Output</h2><pre>{_json(response)}</pre>"
        parts = []
        for choice in response["choices"]:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message") or {"role": "assistant", "content": choice.get("text")}
            parts.append(self._message(message))
            parts.append(f'<p class="snip">finish_reason: {esc(choice.get("finish_reason"))}</p>')
        return f'<h2>Answer</h2><div id="answer">{"".join(parts)}</div>'

    @staticmethod
    def _lineage(steps: Any) -> str:
        if not isinstance(steps, list) or not steps:
            return "<h2>Processing</h2><p class='empty'>No processing steps recorded.</p>"
        rows = []
        for s in steps:
            if not isinstance(s, dict):
                continue
            counts = ", ".join(f"{esc(k)}: {esc(v)}" for k, v in (s.get("counts") or {}).items())
            when = dt.datetime.fromtimestamp(s["ts_ms"] / 1000, dt.UTC) if isinstance(
                s.get("ts_ms"), int) else None  # fmt: skip
            policy = s.get("policy_version")
            rows.append(
                f"<tr><td>{esc(s.get('step'))}</td><td>{esc(s.get('version'))}</td>"
                f"<td><code>{esc(policy) if policy else '—'}</code></td>"
                f'<td>{esc(s.get("action"))}</td><td class="time">{_time(when)}</td>'
                f"<td>{counts or '—'}</td></tr>"
            )
        return (
            '<h2>Processing</h2><table id="lineage"><tr><th>Step</th><th>Version</th>'
            f"<th>Policy</th><th>Action</th><th>Time</th><th>Counts</th></tr>{''.join(rows)}</table>"
        )

    @staticmethod
    def _changes_table(changes: list[dict[str, Any]], title: str) -> str:
        if not changes:
            return f"<h2>{esc(title)}</h2><p class='empty'>None.</p>"
        rows = "".join(
            f'<tr><td class="time">{_time(c["timestamp"])}</td><td>{esc(c["action"])}</td>'
            f"<td>{esc(c['completion_id'])}</td><td>{esc(c['actor'])}</td>"
            f"<td>{esc(c['client'])}</td><td>{esc(c['before'])}</td><td>{esc(c['after'])}</td>"
            "</tr>"
            for c in changes
        )
        return (
            f'<h2>{esc(title)}</h2><table id="changes"><tr><th>Time</th><th>Action</th><th>Id</th>'
            "<th>Who</th><th>Client</th><th>Before</th><th>After</th></tr>" + rows + "</table>"
        )

    async def changes(self, request: Request) -> Response:
        changes = await self.store.list_changes()
        title = "Updates and deletes made through the API (newest first)"
        return page("API changes", self._changes_table(changes, title))
