"""Capture without ASGI, the openai client wrapper (sync and async) and the Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from auditpipe.producer import AuditProducer, capture, metrics_app, record, wrap_openai
from starlette.applications import Starlette
from starlette.routing import Mount

from auditpipe.demo import create_demo_app

from .asgiutil import LineSink, serve
from .test_middleware import CHAT, USAGE_KEYS, stdout_settings


@pytest.fixture
def out() -> Any:
    sink = LineSink()
    producer = AuditProducer(stdout_settings(), stream=sink).start()
    yield producer, sink
    producer.stop()


@pytest.fixture(scope="module")
def demo_url() -> Any:
    with serve(create_demo_app()) as url:
        yield url


class TestCapture:
    def test_context_manager_records_input_output_and_timing(self, out: Any) -> None:
        """The block's output, status, ids and latency end up on one event."""
        producer, sink = out
        with capture(producer, "/rpc/generate", {"prompt": "hi"}, model="m1",
                     metadata={"team": "a"}, traceparent=None) as c:  # fmt: skip
            c.set_output({"text": "hello", "usage": {"input_tokens": 2, "output_tokens": 1}})
        (event,) = sink.wait_for(1)
        assert event["request_id"] == c.request_id and event["endpoint"] == "/rpc/generate"
        assert event["input"] == {"prompt": "hi"} and event["output"]["text"] == "hello"
        assert event["model"] == "m1" and event["metadata"] == {"team": "a"}
        assert event["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        assert event["status_code"] == 200 and event["latency_ms"] >= 0

    def test_exception_in_the_block_propagates_and_is_recorded(self, out: Any) -> None:
        """The caller's exception is re-raised unchanged; the event carries it."""
        producer, sink = out
        with pytest.raises(ValueError, match="bad prompt"):
            with capture(producer, "/rpc/generate", {"prompt": ""}):
                raise ValueError("bad prompt")
        (event,) = sink.wait_for(1)
        assert event["error"] == {"type": "ValueError", "message": "bad prompt"}
        assert event["incomplete"] is True and event["status_code"] == 500

    def test_record_and_gating(self, out: Any) -> None:
        """record() captures at once; force=False applies the store gate."""
        producer, sink = out
        assert record(producer, "/x", {"store": False}, {"ok": 1}, force=False)
        assert record(producer, "/x", {"store": True}, {"ok": 2}, force=False)
        assert record(producer, "/x", {"a": 1}, {"ok": 3}, status=201)
        assert producer.flush(10)
        assert [e["output"]["ok"] for e in sink.events] == [2, 3]
        assert sink.events[1]["status_code"] == 201
        assert producer.stats()["skipped"] == {"not_stored": 1}


class TestOpenAIWrapper:
    def test_sync_call_is_recorded(self, out: Any, demo_url: str) -> None:
        """A plain client call (no store flag): event output equals the client's result."""
        producer, sink = out
        client = wrap_openai(openai.OpenAI(base_url=f"{demo_url}/v1", api_key="k"), producer)
        completion = client.chat.completions.create(**CHAT)
        (event,) = sink.wait_for(1)
        assert event["output"] == completion.model_dump(mode="json", exclude_unset=True)
        assert event["endpoint"] == "/v1/chat/completions"
        assert event["input"] == CHAT and event["model"] == "demo-echo-1"
        assert completion.usage is not None
        assert event["usage"] == completion.usage.model_dump(include=USAGE_KEYS)

    def test_sync_stream_is_assembled_and_early_close_is_incomplete(
        self, out: Any, demo_url: str
    ) -> None:
        """Iterating a wrapped stream yields the same chunks; closing early marks incomplete."""
        producer, sink = out
        client = wrap_openai(openai.OpenAI(base_url=f"{demo_url}/v1", api_key="k"), producer)
        chunks = list(client.chat.completions.create(**CHAT, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        stream = client.chat.completions.create(**CHAT, stream=True)
        next(stream)
        stream.close()
        first, second = sink.wait_for(2)
        assert first["output"]["choices"][0]["message"]["content"] == text
        assert first["chunk_count"] == len(chunks) and first["incomplete"] is False
        assert second["incomplete"] is True and second["chunk_count"] == 1

    def test_async_client_and_errors(self, out: Any, demo_url: str) -> None:
        """AsyncOpenAI: calls and streams recorded; a 404 propagates and is recorded."""
        producer, sink = out

        async def run() -> str:
            client = wrap_openai(
                openai.AsyncOpenAI(base_url=f"{demo_url}/v1", api_key="k", max_retries=0),
                producer,
                metadata={"app": "cost-log"},
            )
            await client.chat.completions.create(**CHAT)
            stream = await client.chat.completions.create(**CHAT, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="nope", messages=CHAT["messages"])
            return text

        text = asyncio.run(run())
        plain, streamed, failed = sink.wait_for(3)
        assert plain["metadata"] == {"app": "cost-log"} and plain["status_code"] == 200
        assert streamed["output"]["choices"][0]["message"]["content"] == text
        assert streamed["stream"] is True
        assert failed["status_code"] == 404
        assert failed["error"]["type"] == "invalid_request_error"


class ProviderIds:
    """ASGI wrapper: answers like a provider, with its own request id in a response header."""

    def __init__(self, app: Any, header: bytes) -> None:
        self.app, self.header = app, header
        self.sent: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                rid = f"req_{len(self.sent)}_{self.header.decode()}"
                self.sent.append(rid)
                message = {**message, "headers": [*message.get("headers", []),
                                                  (self.header, rid.encode())]}  # fmt: skip
            await send(message)

        await self.app(scope, receive, send_with_id)


class TestProviderFields:
    """The queue-logging ticket's fields: provider, the provider's request id, cost in USD."""

    @pytest.mark.parametrize("header", [b"x-request-id", b"request-id", b"apim-request-id"])
    def test_sync_calls_streams_and_errors_carry_the_providers_request_id(
        self, out: Any, header: bytes
    ) -> None:
        producer, sink = out
        app = ProviderIds(create_demo_app(), header)
        with serve(app) as url:
            client = wrap_openai(
                openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0), producer
            )
            client.chat.completions.create(**CHAT)
            list(client.chat.completions.create(**CHAT, stream=True))
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="nope", messages=CHAT["messages"])
            events = sink.wait_for(3)
        assert [e["provider_request_id"] for e in events] == app.sent
        assert {e["provider"] for e in events} == {"127.0.0.1"}  # the host, when not known
        assert [e["status_code"] for e in events] == [200, 200, 404]

    def test_async_client_names_the_provider_given(self, out: Any) -> None:
        producer, sink = out
        app = ProviderIds(create_demo_app(), b"x-request-id")

        async def run(url: str) -> None:
            client = wrap_openai(
                openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k"), producer,
                provider="openrouter",
            )  # fmt: skip
            await client.chat.completions.create(**CHAT)
            stream = await client.chat.completions.create(**CHAT, stream=True)
            [c async for c in stream]

        with serve(app) as url:
            asyncio.run(run(url))
            events = sink.wait_for(2)
        assert [(e["provider"], e["provider_request_id"]) for e in events] == [
            ("openrouter", app.sent[0]), ("openrouter", app.sent[1])
        ]  # fmt: skip

    def test_cost_keeps_its_unit_in_its_names(self, out: Any, demo_url: str) -> None:
        """The ticket's cost {input, output, total} is cost.{input,output,total}_usd here."""
        from auditpipe.processors.enrich import EnrichStep

        producer, sink = out
        client = wrap_openai(openai.OpenAI(base_url=f"{demo_url}/v1", api_key="k"), producer)
        client.chat.completions.create(**CHAT)
        (event,) = sink.wait_for(1)
        cost = EnrichStep()(event)["cost"]
        assert set(cost) == {"input_usd", "output_usd", "total_usd", "estimated"}
        assert cost["total_usd"] > 0

    @pytest.mark.parametrize(
        ("base_url", "name"),
        [
            ("https://api.openai.com/v1", "openai"),
            ("https://openrouter.ai/api/v1", "openrouter"),
            ("https://my-res.openai.azure.com/openai/deployments/x", "azure"),
            ("https://api.groq.com/openai/v1", "groq"),
            ("https://generativelanguage.googleapis.com/v1beta/openai/", "google"),
            ("http://vllm.internal:8000/v1", "vllm.internal"),
        ],
    )
    def test_provider_from_the_base_url(self, base_url: str, name: str) -> None:
        from auditpipe.producer._openai import provider_of

        assert provider_of(base_url) == name


class TestMetrics:
    def test_metrics_app_serves_the_counters(self, out: Any) -> None:
        """Mounted at /metrics: emitted, sent, dropped by reason, queue depth, latency."""
        producer, _ = out
        record(producer, "/x", {}, {})
        assert producer.flush(10)
        producer._stats.dropped["spool_full"] += 2  # as the sender would count them
        app = Starlette(routes=[Mount("/metrics", app=metrics_app(producer))])
        with serve(app) as url:
            text = httpx.get(f"{url}/metrics/").text
        assert 'auditpipe_events_received_total{stage="producer"} 1.0' in text
        assert 'auditpipe_events_sent_total{stage="producer"} 1.0' in text
        assert 'auditpipe_events_dropped_total{reason="spool_full",stage="producer"} 2.0' in text
        assert 'auditpipe_queue_depth{stage="producer"} 0.0' in text
        assert 'auditpipe_latency_seconds_bucket{le="0.001",op="send",stage="producer"}' in text
