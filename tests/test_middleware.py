"""AuditMiddleware over real HTTP (uvicorn) with the real openai client, via the stdout transport.

The stdout transport writes the same JSON rendering the Kafka path encodes, so these tests read
events from a LineSink instead of a topic; test_producer_faults.py covers the Kafka path.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import openai
import pytest
from auditpipe.producer import AuditMiddleware, AuditProducer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from auditpipe.demo import create_demo_app
from auditpipe.settings import Settings, load_settings

from .asgiutil import LineSink, RecordingApp, serve

USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}
CHAT = {"model": "demo-echo-1", "messages": [{"role": "user", "content": "hello there world"}]}


def stdout_settings(env: dict[str, str] | None = None, **producer: Any) -> Settings:
    base = load_settings(env={"AUDITPIPE_PRODUCER_TRANSPORT": "stdout", **(env or {})})
    return base.model_copy(update={"producer": base.producer.model_copy(update=producer)})


class Harness:
    def __init__(self, app: Any = None, env: dict[str, str] | None = None, **producer: Any):
        self.sink = LineSink()
        self.producer = AuditProducer(stdout_settings(env, **producer), stream=self.sink)
        self.app = AuditMiddleware(app if app is not None else create_demo_app(), self.producer)

    def __enter__(self) -> Harness:
        self.producer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.producer.stop()

    def events_after_flush(self) -> list[dict[str, Any]]:
        assert self.producer.flush(10), "producer did not drain"
        return list(self.sink.events)


@pytest.fixture
def harness() -> Any:
    with Harness() as h:
        yield h


def client_for(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test-secret", max_retries=0, **kw)


class TestOpenAIClient:
    def test_non_streaming_event_output_equals_what_the_client_got(self, harness: Any) -> None:
        """store=true: the event's output is the response the client parsed; ids match."""
        with serve(harness.app) as url:
            raw = client_for(url).chat.completions.with_raw_response.create(
                **CHAT, store=True, metadata={"ticket": "SN-1"}
            )
            completion = raw.parse()
        (event,) = harness.sink.wait_for(1)
        assert event["output"] == completion.model_dump(mode="json", exclude_unset=True)
        assert event["request_id"] == raw.headers["x-request-id"]
        assert event["input"]["messages"] == CHAT["messages"] and event["store"] is True
        assert event["metadata"] == {"ticket": "SN-1"} and event["metadata_dropped"] == 0
        assert completion.usage is not None
        assert event["usage"] == completion.usage.model_dump(include=USAGE_KEYS)
        assert event["status_code"] == 200 and event["stream"] is False
        assert event["endpoint"] == "/v1/chat/completions" and event["model"] == "demo-echo-1"
        assert "authorization" not in event["headers"]
        assert event["headers"]["user-agent"].startswith("OpenAI/Python")

    def test_streaming_event_output_equals_what_the_client_assembled(self, harness: Any) -> None:
        """One event per stream: assembled message, finish_reason, usage, chunk count, ttft."""
        with serve(harness.app) as url:
            stream = client_for(url).chat.completions.create(
                **CHAT, store=True, stream=True, stream_options={"include_usage": True}
            )
            chunks = list(stream)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = next(c.usage for c in chunks if c.usage)
        (event,) = harness.sink.wait_for(1)
        out = event["output"]
        assert out["object"] == "chat.completion" and out["id"] == chunks[0].id
        assert out["choices"][0]["message"] == {"role": "assistant", "content": content}
        assert out["choices"][0]["finish_reason"] == finish == "stop"
        assert out["usage"] == usage.model_dump(mode="json", exclude_unset=True)
        assert event["usage"] == usage.model_dump(include=USAGE_KEYS)
        assert event["chunk_count"] == len(chunks) and event["stream"] is True
        assert event["incomplete"] is False and event["ttft_ms"] is not None
        assert event["ttft_ms"] <= event["latency_ms"]

    def test_streamed_tool_calls_equal_the_clients_final_completion(self, harness: Any) -> None:
        """Tool-call deltas are assembled like the openai client's own stream helper does."""
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"text": {"type": "string"}}}}}]  # fmt: skip
        body = {**CHAT, "messages": [{"role": "user", "content": "call the weather desk"}]}
        with serve(harness.app) as url:
            with client_for(url).chat.completions.stream(**body, tools=tools, store=True) as stream:
                final = stream.get_final_completion()
        (event,) = harness.sink.wait_for(1)
        choice = event["output"]["choices"][0]
        want = final.choices[0]
        assert choice["finish_reason"] == want.finish_reason == "tool_calls"
        assert want.message.tool_calls
        got_calls = [(c["id"], c["function"]["name"], c["function"]["arguments"])
                     for c in choice["message"]["tool_calls"]]  # fmt: skip
        want_calls = [(c.id, c.function.name, c.function.arguments)
                      for c in want.message.tool_calls]  # fmt: skip
        assert got_calls == want_calls and '"the weather desk"' in got_calls[0][2]

    def test_async_client_streaming(self, harness: Any) -> None:
        """The async client sees the same stream; one event arrives."""

        async def run(url: str) -> str:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
            stream = await client.chat.completions.create(**CHAT, store=True, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        with serve(harness.app) as url:
            text = asyncio.run(run(url))
        (event,) = harness.sink.wait_for(1)
        assert event["output"]["choices"][0]["message"]["content"] == text


class TestPassthrough:
    def test_sse_bytes_reach_the_client_identical(self) -> None:
        """The bytes the client reads equal the bytes the app sent, chunk stream unchanged."""
        recorder = RecordingApp(create_demo_app())
        with Harness(recorder) as h, serve(h.app) as url:
            body = {**CHAT, "store": True, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                received = b"".join(r.iter_raw())
        assert received == b"".join(recorder.sent) and received.endswith(b"data: [DONE]\n\n")
        assert len(h.sink.wait_for(1)) == 1

    def test_json_bytes_and_headers_identical_except_the_request_id(self) -> None:
        """Non-streaming: same body bytes, same headers plus x-request-id, same status."""
        with serve(create_demo_app()) as plain_url, Harness() as h, serve(h.app) as url:
            bad = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
            a = httpx.post(f"{plain_url}/v1/chat/completions", json=bad)
            b = httpx.post(f"{url}/v1/chat/completions", json={**bad, "store": True})
        assert a.status_code == b.status_code == 404
        assert a.content == b.content
        ha = {k: v for k, v in a.headers.items() if k != "date"}
        hb = {k: v for k, v in b.headers.items() if k not in ("date", "x-request-id")}
        assert ha == hb and b.headers["x-request-id"]

    def test_stream_is_not_buffered(self) -> None:
        """The client gets the first chunk while the app still waits to send the second."""
        first_seen = threading.Event()

        async def gen() -> Any:
            yield b'data: {"n": 1}\n\n'
            for _ in range(500):  # up to 10 s
                if first_seen.is_set():
                    yield b'data: {"n": 2}\n\n'
                    return
                await asyncio.sleep(0.02)
            yield b'data: {"n": "buffered"}\n\n'

        async def endpoint(request: Request) -> Response:
            await request.body()
            return StreamingResponse(gen(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])
        with Harness(app) as h, serve(h.app) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={"store": True}) as r:
                parts = []
                for part in r.iter_raw():
                    parts.append(part)
                    first_seen.set()
        assert b"".join(parts) == b'data: {"n": 1}\n\ndata: {"n": 2}\n\n'
        (event,) = h.sink.wait_for(1)
        assert event["output"] == {"object": "stream", "chunks": [{"n": 1}, {"n": 2}]}

    def test_client_disconnect_mid_stream_gives_an_incomplete_event(self) -> None:
        """A client that goes away after a few chunks: one event, incomplete, partial output."""

        async def gen() -> Any:
            for i in range(400):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
                         "choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                      "finish_reason": None}]}  # fmt: skip
                yield b"data: " + httpx._utils.to_bytes(__import__("json").dumps(chunk)) + b"\n\n"
                await asyncio.sleep(0.01)

        async def endpoint(request: Request) -> Response:
            await request.body()
            return StreamingResponse(gen(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])
        with Harness(app) as h, serve(h.app) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={"store": True}) as r:
                got = b""
                for part in r.iter_raw():
                    got += part
                    if got.count(b"\n\n") >= 3:
                        break
            (event,) = h.sink.wait_for(1, timeout_secs=20)
        assert event["incomplete"] is True and event["stream"] is True
        content = event["output"]["choices"][0]["message"]["content"]
        assert content.startswith("w0 w1 w2 ") and 3 <= event["chunk_count"] < 400
        assert event["output"]["choices"][0]["finish_reason"] is None


class TestGating:
    def test_only_stored_requests_are_captured(self, harness: Any) -> None:
        """No store flag: nothing recorded (counted as skipped); store=false likewise."""
        with serve(harness.app) as url:
            httpx.post(f"{url}/v1/chat/completions", json=CHAT)
            httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "store": False})
            httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "store": True})
        events = harness.events_after_flush()
        assert len(events) == 1 and events[0]["input"]["store"] is True
        assert harness.producer.stats()["skipped"] == {"not_stored": 1}

    def test_header_opts_in(self, harness: Any) -> None:
        """x-auditpipe-store: true captures a request whose body does not say store."""
        with serve(harness.app) as url:
            httpx.post(f"{url}/v1/chat/completions", json=CHAT,
                       headers={"x-auditpipe-store": "true"})  # fmt: skip
        (event,) = harness.sink.wait_for(1)
        assert event["input"] == CHAT

    def test_capture_all(self) -> None:
        """capture = "all" records every request on the captured paths, and no other path."""
        with Harness(capture="all") as h, serve(h.app) as url:
            httpx.post(f"{url}/v1/chat/completions", json=CHAT)
            httpx.get(f"{url}/v1/models")
            events = h.events_after_flush()
        assert [e["endpoint"] for e in events] == ["/v1/chat/completions"]

    def test_auditpipe_enabled_0_turns_capture_off(self) -> None:
        """AUDITPIPE_ENABLED=0: no event, no thread, and responses are not touched at all."""
        with Harness(env={"AUDITPIPE_ENABLED": "0"}, capture="all") as h, serve(h.app) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "store": True})
            assert r.status_code == 200 and "x-request-id" not in r.headers
            assert h.producer._thread is None
        assert h.sink.events == [] and h.producer.stats()["emitted"] == 0

    def test_dyn_audit_stdout_selects_the_stdout_transport(self) -> None:
        """DYN_AUDIT_STDOUT=1 (Dynamo phase 1) selects transport stdout; explicit keys win."""
        assert load_settings(env={"DYN_AUDIT_STDOUT": "1"}).producer.transport == "stdout"
        env = {"DYN_AUDIT_STDOUT": "1", "AUDITPIPE_PRODUCER_TRANSPORT": "kafka"}
        assert load_settings(env=env).producer.transport == "kafka"
        assert load_settings(env={"AUDITPIPE_ENABLED": "0"}).producer.enabled is False


class TestErrorsAndContext:
    def test_http_error_is_captured(self, harness: Any) -> None:
        """A 404 from the app: status and the OpenAI error type/message on the event."""
        with serve(harness.app) as url:
            with pytest.raises(openai.NotFoundError):
                client_for(url).chat.completions.create(
                    model="nope", messages=CHAT["messages"], store=True
                )
        (event,) = harness.sink.wait_for(1)
        assert event["status_code"] == 404
        assert event["error"] == {"type": "invalid_request_error",
                                  "message": "model 'nope' does not exist"}  # fmt: skip

    def test_app_exception_propagates_and_is_captured(self, harness: Any) -> None:
        """The app raises: the same exception reaches the server, the event says why."""

        async def boom(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            raise RuntimeError("model crashed")

        mw = AuditMiddleware(boom, harness.producer)
        with pytest.raises(RuntimeError, match="model crashed"):
            asyncio.run(_call(mw, b'{"store": true}'))
        (event,) = harness.sink.wait_for(1)
        assert event["error"] == {"type": "RuntimeError", "message": "model crashed"}
        assert event["status_code"] == 500 and event["incomplete"] is True

    def test_request_id_and_traceparent(self, harness: Any) -> None:
        """An incoming x-request-id is kept and echoed; traceparent fills trace/span ids."""
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with serve(harness.app) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "store": True},
                           headers={"x-request-id": "req-123", "traceparent": tp})  # fmt: skip
        assert r.headers["x-request-id"] == "req-123"
        (event,) = harness.sink.wait_for(1)
        assert event["request_id"] == "req-123"
        assert event["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert event["span_id"] == "00f067aa0ba902b7"

    def test_opentelemetry_current_span_is_used(self, harness: Any) -> None:
        """With an OTel span current around the request, its ids go on the event."""
        from opentelemetry.sdk.trace import TracerProvider

        tracer = TracerProvider().get_tracer("test")

        async def ok(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        async def run() -> Any:
            with tracer.start_as_current_span("server") as span:
                await _call(AuditMiddleware(ok, harness.producer), b'{"store": true}')
                return span.get_span_context()

        ctx = asyncio.run(run())
        (event,) = harness.sink.wait_for(1)
        assert event["trace_id"] == f"{ctx.trace_id:032x}"
        assert event["span_id"] == f"{ctx.span_id:016x}"

    def test_metadata_is_limited_like_openai(self, harness: Any) -> None:
        """16 pairs, keys <= 64 chars, values <= 512: the rest are counted in metadata_dropped."""
        meta = {f"k{i}": "v" for i in range(18)}
        meta["x" * 65] = "long key"
        meta["long"] = "v" * 513
        with serve(harness.app) as url:
            httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "store": True, "metadata": meta})
        (event,) = harness.sink.wait_for(1)
        assert event["metadata"] == {f"k{i}": "v" for i in range(16)}
        assert event["metadata_dropped"] == 4

    def test_credentials_are_never_recorded(self) -> None:
        """Even when the allowlist names them, credential headers stay out of the event."""
        allow = ["authorization", "cookie", "x-api-key", "api-key", "proxy-authorization",
                 "x-tenant"]  # fmt: skip
        with Harness(header_allowlist=allow) as h, serve(h.app) as url:
            headers = {"authorization": "Bearer sk-live", "cookie": "s=1", "x-api-key": "k",
                       "api-key": "k", "proxy-authorization": "Basic x", "x-tenant": "acme",
                       "x-other": "not allowed"}  # fmt: skip
            httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "store": True}, headers=headers)
        (event,) = h.sink.wait_for(1)
        assert event["headers"] == {"x-tenant": "acme"}

    def test_payload_caps_truncate_with_a_marker(self) -> None:
        """Input and output over max_payload_bytes are replaced by a marker; the flag is set."""
        big = {**CHAT, "store": True, "messages": [{"role": "user", "content": "word " * 400}]}
        with Harness(max_payload_bytes=512) as h, serve(h.app) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json=big)
        assert len(r.content) > 512  # the client still gets everything
        (event,) = h.sink.wait_for(1)
        assert event["truncated"] is True
        for key in ("input", "output"):
            marker = event[key]
            assert marker["_auditpipe_truncated"] is True and marker["original_bytes"] > 512
            assert len(marker["head"].encode()) <= 512


class TestPaths:
    def test_open_inference_protocol_v2(self, harness: Any) -> None:
        """/v2/models/{name}[/versions/{v}]/infer: model from the path, the JSON bodies."""

        async def infer(request: Request) -> Response:
            body = await request.json()
            return JSONResponse({"model_name": request.path_params["name"], "id": body["id"],
                                 "outputs": [{"name": "y", "shape": [1], "datatype": "FP32",
                                              "data": [2.0]}]})  # fmt: skip

        app = Starlette(routes=[
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        ])  # fmt: skip
        mw = AuditMiddleware(app, harness.producer)
        tensor = {"id": "1", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                         "data": [1.0]}]}  # fmt: skip
        with serve(mw) as url:
            for path in ("/v2/models/resnet/infer", "/v2/models/bert/versions/3/infer"):
                httpx.post(url + path, json=tensor, headers={"x-auditpipe-store": "true"})
        events = harness.sink.wait_for(2)
        assert [e["model"] for e in events] == ["resnet", "bert"]
        assert events[0]["output"]["outputs"][0]["data"] == [2.0]
        assert events[1]["input"] == tensor

    def test_configured_patterns_replace_the_defaults(self, harness: Any) -> None:
        """paths=[...] captures those paths only."""

        async def echo(request: Request) -> Response:
            return Response(await request.body(), media_type="application/json")

        app = Starlette(
            routes=[
                Route("/{a}/{b}/run", echo, methods=["POST"]),
                Route("/v1/chat/completions", echo, methods=["POST"]),
            ]
        )
        mw = AuditMiddleware(app, harness.producer, paths=["/tenants/{tenant}/run"])
        with serve(mw) as url:
            httpx.post(f"{url}/v1/chat/completions", json={"store": True, "n": 1})
            httpx.post(f"{url}/tenants/acme/run", json={"store": True, "n": 2})
        events = harness.events_after_flush()
        assert [e["endpoint"] for e in events] == ["/tenants/acme/run"]


async def _call(app: Any, body: bytes, path: str = "/v1/chat/completions") -> list[Any]:
    """Invoke an ASGI app once with ``body``; returns the messages it sent."""
    sent: list[Any] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Any:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return sent
