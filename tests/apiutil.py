"""Stored records made by real traffic, loaded by the real sink, served by ``auditpipe serve``.

``captured_events()`` sends requests with the official openai client to the demo server
wrapped in ``AuditMiddleware`` (stdout transport into a LineSink): plain, streamed (with and
without usage), tool calls, an error, metadata; then runs the default processor chain
(enrich, redact, sample) over them as a worker would. ``load()`` writes events into a fresh
schema with ``PostgresSink.write``. ``ApiServer`` runs ``create_app`` in a uvicorn thread.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
from auditpipe.api.app import create_app
from auditpipe.api.auth import KeyRing
from auditpipe.api.store import Store
from auditpipe.producer import AuditMiddleware, AuditProducer
from auditpipe.schemas import Event, new_event
from auditpipe.sinks.postgres import PostgresConfig, PostgresSink

from auditpipe.broker import free_port
from auditpipe.demo import create_demo_app
from auditpipe.settings import ServeSettings, load_settings

from .asgiutil import LineSink, serve
from .conftest import wait_until

RW_KEY = "sk-rw-" + "a" * 24
READ_KEY = "sk-ro-" + "b" * 24
NAMED_KEY = "sk-named-" + "c" * 24
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
PII = "Mail me at jane.doe@example.com or call +1 415 555 0134 <script>alert('x')</script>"


def captured_events(plain: int = 40) -> tuple[list[Event], dict[str, Any]]:
    """Events from real openai-client traffic; also what the client got back, by request id."""
    from auditpipe.processors import chain_for

    sink = LineSink()
    settings = load_settings(env={"AUDITPIPE_PRODUCER_TRANSPORT": "stdout"})
    producer = AuditProducer(settings, stream=sink).start()
    got: dict[str, Any] = {}
    try:
        with serve(AuditMiddleware(create_demo_app(), producer)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-client", max_retries=0)
            for i in range(plain):
                rid = f"plain-{i:03d}"
                got[rid] = client.chat.completions.create(
                    model="demo-echo-1" if i % 4 else "demo-echo-large",
                    messages=[
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"Question {i}?"},
                    ],
                    store=True,
                    metadata={"team": "a" if i % 2 else "b", "seq": str(i)},
                    extra_headers={"x-request-id": rid},
                )
            for rid, options in [
                ("stream-usage", {"stream_options": {"include_usage": True}}),
                ("stream-bare", {}),
                ("stream-tool", {"tools": TOOLS}),
            ]:
                content = "call the weather" if rid == "stream-tool" else "Tell me a story"
                stream = client.chat.completions.create(
                    model="demo-echo-1",
                    messages=[{"role": "user", "content": content}],
                    store=True,
                    stream=True,
                    metadata={"kind": "stream"},
                    extra_headers={"x-request-id": rid},
                    **options,
                )
                got[rid] = list(stream)
            got["pii"] = client.chat.completions.create(
                model="demo-echo-1",
                messages=[{"role": "user", "content": PII}],
                store=True,
                metadata={"kind": "pii"},
                extra_headers={"x-request-id": "pii"},
            )
            got["tool"] = client.chat.completions.create(
                model="demo-echo-1",
                messages=[{"role": "user", "content": "call home"}],
                tools=TOOLS,
                store=True,
                metadata={"kind": "tool"},  # type: ignore[arg-type]
                extra_headers={"x-request-id": "tool"},
            )
            try:
                client.chat.completions.create(
                    model="no-such-model",
                    messages=[{"role": "user", "content": "hi"}],
                    store=True,
                    extra_headers={"x-request-id": "error"},
                )
            except openai.NotFoundError:
                pass
        assert producer.flush(10)
    finally:
        producer.stop()
    events = sink.wait_for(plain + 6)
    chain = chain_for({}, "test")
    processed = []
    for event in events:
        for step in chain:
            event = step(event)
        processed.append(event)
    processed.append(
        new_event(
            request_id="embedding",
            endpoint="/v1/embeddings",
            model="emb-1",
            status_code=200,
            store=True,
            input={"model": "emb-1", "input": "hello"},
            output={"object": "list", "data": [{"embedding": [0.1, 0.2]}]},
        )
    )
    return processed, got


def by_request(events: list[Event]) -> dict[str, Event]:
    return {e["request_id"]: e for e in events}


def new_schema() -> str:
    return f"api_{uuid.uuid4().hex[:10]}"


def load(dsn: str, schema: str, events: list[Event]) -> None:
    async def run() -> None:
        sink = PostgresSink.from_mapping({"dsn": dsn, "schema_name": schema, "auto_migrate": True})
        await sink.start()
        try:
            await sink.write(events)
        finally:
            await sink.stop()

    asyncio.run(run())


class ApiServer:
    """``create_app`` over a schema, served by uvicorn in a thread (lifespan on)."""

    def __init__(self, dsn: str, schema: str, **serve: Any) -> None:
        import uvicorn

        settings = ServeSettings(**serve)
        config = PostgresConfig(dsn=dsn, schema_name=schema)
        self.app = create_app(
            Store(config, settings, dsn), KeyRing(settings), page_size=settings.page_size
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 15, "the API server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, key: str = RW_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@contextmanager
def api_server(dsn: str, events: list[Event], **serve: Any) -> Iterator[ApiServer]:
    schema = new_schema()
    load(dsn, schema, events)
    keys = {"api_keys": [RW_KEY, {"name": "alice", "key": NAMED_KEY}], "read_api_keys": [READ_KEY]}
    with ApiServer(dsn, schema, **{**keys, **serve}) as server:
        server.schema = schema  # type: ignore[attr-defined]
        yield server
