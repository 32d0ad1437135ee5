"""`auditpipe proxy` end to end: the official openai client -> the proxy (a real subprocess) ->
a plain OpenAI-compatible server that auditpipe does not wrap (tests/upstream.py, uvicorn).

Events are read from a real transport: the proxy's stdout (``DYN_AUDIT_STDOUT=1``), and Kafka
(the session's embedded broker) in TestKafka.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from auditpipe.producer.proxy import HOP_BY_HOP
from auditpipe.schemas import decode

from auditpipe.broker import free_port
from auditpipe.settings import Settings

from .asgiutil import serve
from .conftest import wait_until
from .kafkautil import consume
from .upstream import Upstream

SECRET = "sk-test-secret-4f7a"
CHAT = {"model": "demo-echo-1", "messages": [{"role": "user", "content": "hello there world"}]}


class ProxyProcess:
    """``auditpipe proxy`` as a subprocess; its stdout lines (events) are collected."""

    def __init__(self, upstream: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "DYN_AUDIT_STDOUT": "1", **(env or {})}
        full_env.pop("AUDITPIPE_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "auditpipe", "proxy", "--upstream", upstream,
             "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
        )  # fmt: skip
        self.raw: list[bytes] = []
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        wait_until(self._listening, 20, "the proxy to listen")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            self.events.append(orjson.loads(line))

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=SECRET, max_retries=0, **kw)

    def event_for(self, request_id: str, timeout_secs: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((e for e in self.events if e["request_id"] == request_id), None)

        return wait_until(find, timeout_secs, f"the event of request {request_id}")  # type: ignore[no-any-return]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return code


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Upstream]]:
    app = Upstream()
    with serve(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def proxy(upstream: tuple[str, Upstream]) -> Iterator[ProxyProcess]:
    p = ProxyProcess(upstream[0], env={"AUDITPIPE_PROXY_READ_TIMEOUT_SECS": "1.5"})
    yield p
    assert p.stop() == 0, p.stderr
    assert b"Traceback" not in p.stderr or b"UpstreamError" in p.stderr, p.stderr
    assert not any(SECRET.encode() in line for line in p.raw), "the API key was recorded"


def rid() -> str:
    return os.urandom(8).hex()


class TestForwarding:
    def test_non_streaming_answer_and_event(self, proxy: ProxyProcess, upstream: Any) -> None:
        """The client gets the upstream's answer; the event holds it, with the request's id."""
        request_id = rid()
        raw = proxy.client().chat.completions.with_raw_response.create(
            **CHAT, store=True, metadata={"ticket": "SN-1"},
            extra_headers={"x-request-id": request_id},
        )  # fmt: skip
        completion = raw.parse()
        assert raw.headers["x-request-id"] == request_id
        assert completion.choices[0].message.content.endswith("You said: hello there world")
        event = proxy.event_for(request_id)
        assert event["output"] == completion.model_dump(mode="json", exclude_unset=True)
        assert event["input"]["messages"] == CHAT["messages"] and event["store"] is True
        assert event["status_code"] == 200 and event["stream"] is False
        assert event["metadata"] == {"ticket": "SN-1"} and event["model"] == "demo-echo-1"
        assert event["usage"]["total_tokens"] == completion.usage.total_tokens  # type: ignore[union-attr]
        assert event["latency_ms"] > 0 and event["incomplete"] is False

    def test_api_key_forwarded_upstream_but_never_recorded(
        self, proxy: ProxyProcess, upstream: Any
    ) -> None:
        """The upstream receives the client's Authorization; the event's headers do not."""
        request_id = rid()
        proxy.client().chat.completions.create(
            **CHAT, store=True, extra_headers={"x-request-id": request_id}
        )
        seen = next(r for r in upstream[1].state["requests"]
                    if ("x-request-id", request_id) in r["headers"])  # fmt: skip
        assert ("authorization", f"Bearer {SECRET}") in seen["headers"]
        event = proxy.event_for(request_id)
        assert "authorization" not in event["headers"]
        assert SECRET not in orjson.dumps(event).decode()

    def test_generated_request_id_goes_upstream_and_back(
        self, proxy: ProxyProcess, upstream: Any
    ) -> None:
        """Without x-request-id, the id the event is recorded under is sent upstream and
        returned to the client."""
        raw = proxy.client().chat.completions.with_raw_response.create(**CHAT, store=True)
        request_id = raw.headers["x-request-id"]
        event = proxy.event_for(request_id)
        assert event["request_id"] == request_id
        assert any(("x-request-id", request_id) in r["headers"]
                   for r in upstream[1].state["requests"])  # fmt: skip

    def test_streaming_arrives_chunk_by_chunk_and_is_assembled(self, proxy: ProxyProcess) -> None:
        """SSE chunks reach the client as the upstream sends them (the first one long before
        the last is written); the event holds the assembled message and TTFT."""
        request_id = rid()
        stream = proxy.client().chat.completions.create(
            **CHAT, store=True, stream=True, stream_options={"include_usage": True},
            extra_headers={"x-request-id": request_id},
        )  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        event = proxy.event_for(request_id)
        assert event["stream"] is True and event["incomplete"] is False
        assert event["output"]["choices"][0]["message"]["content"] == text
        assert event["usage"]["total_tokens"] == chunks[-1].usage.total_tokens  # type: ignore[union-attr]
        assert event["chunk_count"] == len(chunks)
        assert 0 < event["ttft_ms"] <= event["latency_ms"]

    def test_stream_is_not_buffered(self, proxy: ProxyProcess, upstream: Any) -> None:
        """The first chunk reaches the client while the upstream has sent only a few of 500."""
        state = upstream[1].state
        request_id = rid()
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions",
                          json={"model": "slow-stream", "messages": [], "store": True},
                          headers={"x-request-id": request_id}) as r:  # fmt: skip
            first = next(r.iter_raw())
            assert first.startswith(b"data: ") and state["slow_sent"] < 50
        proxy.event_for(request_id)

    def test_store_false_or_absent_is_forwarded_not_recorded(self, proxy: ProxyProcess) -> None:
        """Gating is the middleware's: no store flag, or store=false: answered, not recorded."""
        ids = [rid(), rid(), rid()]
        client = proxy.client()
        client.chat.completions.create(**CHAT, extra_headers={"x-request-id": ids[0]})
        client.chat.completions.create(**CHAT, store=False, extra_headers={"x-request-id": ids[1]})
        client.chat.completions.create(**CHAT, store=True, extra_headers={"x-request-id": ids[2]})
        proxy.event_for(ids[2])  # events leave in order: the others would have come first
        assert not [e for e in proxy.events if e["request_id"] in ids[:2]]

    def test_client_disconnect_mid_stream_reaches_the_upstream(
        self, proxy: ProxyProcess, upstream: Any
    ) -> None:
        """A client that leaves mid-stream: the upstream sees the disconnect and stops; the
        event is incomplete with what was streamed."""
        state = upstream[1].state
        state["slow_disconnected"] = False
        request_id = rid()
        stream = proxy.client().chat.completions.create(
            model="slow-stream", messages=[{"role": "user", "content": "x"}], store=True,
            stream=True, extra_headers={"x-request-id": request_id},
        )  # fmt: skip
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
        wait_until(lambda: state["slow_disconnected"], 10, "the upstream to see the disconnect")
        assert state["slow_sent"] < 500
        event = proxy.event_for(request_id)
        assert event["incomplete"] is True and event["stream"] is True
        assert event["output"]["choices"][0]["message"]["content"].startswith("w0 w1 w2 ")

    def test_gzip_passes_through_and_is_decoded_for_the_event(self, proxy: ProxyProcess) -> None:
        """A gzip answer reaches the client compressed (content-encoding and length kept); the
        event holds the decoded JSON."""
        request_id = rid()
        body = {**CHAT, "model": "gzip", "store": True}
        r = httpx.post(f"{proxy.url}/v1/chat/completions", json=body,
                       headers={"x-request-id": request_id, "accept-encoding": "gzip"})  # fmt: skip
        assert r.headers["content-encoding"] == "gzip"
        assert int(r.headers["content-length"]) == r.num_bytes_downloaded
        event = proxy.event_for(request_id)
        assert event["output"] == r.json() and event["output"]["object"] == "chat.completion"

    def test_headers_path_and_query_as_a_proxy_must(
        self, proxy: ProxyProcess, upstream: Any
    ) -> None:
        """Hop-by-hop headers stay behind, Host names the upstream, X-Forwarded-* are added,
        repeated headers, content-length, the raw path and the query arrive unchanged."""
        headers = [("connection", "keep-alive, x-private-hop"), ("x-private-hop", "1"),
                   ("keep-alive", "timeout=5"), ("x-multi", "a"), ("x-multi", "b"),
                   ("authorization", "Bearer abc")]  # fmt: skip
        r = httpx.post(f"{proxy.url}/echo/a%2Fb?q=%20x&q=2", content=b"12345", headers=headers)
        got = r.json()
        names = [k for k, _ in got["headers"]]
        assert got["raw_path"] == "/echo/a%2Fb" and got["query"] == "q=%20x&q=2"
        assert got["body_bytes"] == 5 and ["content-length", "5"] in got["headers"]
        assert not HOP_BY_HOP.intersection(n.encode() for n in names)
        assert "x-private-hop" not in names
        assert [v for k, v in got["headers"] if k == "x-multi"] == ["a", "b"]
        assert ["host", upstream[0].split("://")[1]] in got["headers"]
        assert ["x-forwarded-for", "127.0.0.1"] in got["headers"]
        assert ["x-forwarded-host", f"127.0.0.1:{proxy.port}"] in got["headers"]
        assert ["authorization", "Bearer abc"] in got["headers"]
        assert r.headers["content-length"] == str(len(r.content))

    def test_request_bodies_stream_upstream(self, proxy: ProxyProcess) -> None:
        """A chunked upload (no length) and a large one with a length both arrive whole."""

        def parts() -> Iterator[bytes]:
            for _ in range(64):
                yield b"x" * 4096

        chunked = httpx.post(f"{proxy.url}/echo", content=parts()).json()
        assert chunked["body_bytes"] == 64 * 4096
        assert ["transfer-encoding", "chunked"] in chunked["headers"]
        sized = httpx.post(f"{proxy.url}/echo", content=b"y" * 3_000_000).json()
        assert sized["body_bytes"] == 3_000_000
        assert ["content-length", "3000000"] in sized["headers"]


class TestUpstreamFailures:
    def test_upstream_4xx_and_5xx_reach_the_client_and_are_recorded(
        self, proxy: ProxyProcess
    ) -> None:
        """A 404 and a 500 from the upstream: the client gets them as the upstream sent them;
        the events hold the status and the error."""
        client = proxy.client()
        ids = [rid(), rid()]
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(**{**CHAT, "model": "no-such-model"}, store=True,
                                           extra_headers={"x-request-id": ids[0]})  # fmt: skip
        with pytest.raises(openai.InternalServerError, match="the model crashed"):
            client.chat.completions.create(**{**CHAT, "model": "fail-500"}, store=True,
                                           extra_headers={"x-request-id": ids[1]})  # fmt: skip
        e404, e500 = proxy.event_for(ids[0]), proxy.event_for(ids[1])
        assert e404["status_code"] == 404 and e404["error"]["type"] == "invalid_request_error"
        assert e500["status_code"] == 500 and e500["error"] == {
            "type": "server_error", "message": "the model crashed"}  # fmt: skip

    def test_upstream_timeout_gives_504_and_an_error_record(self, proxy: ProxyProcess) -> None:
        """No answer within read_timeout_secs (1.5 s here): 504 in OpenAI's error shape."""
        request_id = rid()
        with pytest.raises(openai.APIStatusError) as info:
            proxy.client().chat.completions.create(
                **{**CHAT, "model": "sleepy"}, store=True,
                extra_headers={"x-request-id": request_id},
            )  # fmt: skip
        assert info.value.status_code == 504
        assert info.value.body["code"] == "upstream_timeout"  # type: ignore[index]
        event = proxy.event_for(request_id)
        assert event["status_code"] == 504 and event["error"]["type"] == "upstream_error"

    def test_upstream_failing_mid_stream_cuts_the_client_and_is_recorded(
        self, proxy: ProxyProcess
    ) -> None:
        """The upstream drops the connection after two chunks: the client's stream breaks (it
        must not look complete) and the event says why."""
        request_id = rid()
        stream = proxy.client().chat.completions.create(
            model="cut", messages=[], store=True, stream=True,
            extra_headers={"x-request-id": request_id},
        )  # fmt: skip
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            list(stream)
        event = proxy.event_for(request_id)
        assert event["incomplete"] is True and event["error"]["type"] == "UpstreamError"
        assert event["output"]["choices"][0]["message"]["content"] == "part0 part1 "

    def test_upstream_down_gives_502_and_an_error_record(self) -> None:
        """Nothing listens upstream: every request gets a 502 in OpenAI's error shape; the
        stored ones are recorded with the error."""
        down = ProxyProcess(f"http://127.0.0.1:{free_port()}")
        try:
            request_id = rid()
            with pytest.raises(openai.APIStatusError) as info:
                down.client().chat.completions.create(
                    **CHAT, store=True, extra_headers={"x-request-id": request_id}
                )
            assert info.value.status_code == 502
            assert info.value.body["code"] == "upstream_unreachable"  # type: ignore[index]
            r = httpx.get(f"{down.url}/v1/models")
            assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
            event = down.event_for(request_id)
            assert event["status_code"] == 502 and event["input"]["messages"] == CHAT["messages"]
            assert event["error"]["type"] == "upstream_error"
        finally:
            assert down.stop() == 0
        assert b"upstream_unreachable" in down.stderr  # counted, and logged once


class TestDecodeBody:
    """Content-encoded captures are decoded for the event, never past the size bound."""

    def test_codings_and_the_bound(self) -> None:
        import gzip
        import zlib

        from auditpipe.producer._event import decode_body

        body = b'{"a": "' + b"x" * 100_000 + b'"}'
        assert decode_body(gzip.compress(body), "gzip", 1 << 20) == (body, False)
        raw = zlib.compressobj(wbits=-15)
        assert decode_body(raw.compress(body) + raw.flush(), "deflate", 1 << 20) == (body, False)
        assert decode_body(zlib.compress(body), "deflate", 1 << 20) == (body, False)
        assert decode_body(gzip.compress(gzip.compress(body)), "gzip, gzip", 1 << 20)[0] == body
        bomb = gzip.compress(b"0" * 50_000_000)  # 50 MB from ~50 KB
        out, cut = decode_body(bomb, "gzip", 4096)
        assert out is not None and len(out) == 4096 and cut is True
        assert decode_body(b"\x8b\x00garbage", "br", 4096) == (None, False)  # no bounded brotli
        assert decode_body(b"not gzip", "gzip", 4096)[0] is None

    def test_zstd_when_available(self) -> None:
        zstd = pytest.importorskip("backports.zstd")  # the standard library's from 3.14
        from auditpipe.producer._event import decode_body

        body = b"y" * 10_000
        assert decode_body(zstd.compress(body), "zstd", 1 << 20) == (body, False)
        assert decode_body(zstd.compress(body), "zstd", 100) == (body[:100], True)


class TestKafka:
    def test_proxy_to_kafka_end_to_end(self, settings: Settings, upstream: Any) -> None:
        """`auditpipe proxy` with the Kafka transport: a stored streaming exchange arrives on
        the raw topic as an Avro event; the API key is nowhere in it."""
        env = {"DYN_AUDIT_STDOUT": "0", "AUDITPIPE_KAFKA_BOOTSTRAP": settings.kafka.bootstrap or "",
               "AUDITPIPE_KAFKA_RAW_TOPIC": settings.kafka.raw_topic}  # fmt: skip
        p = ProxyProcess(upstream[0], env=env)
        try:
            request_id = rid()
            stream = p.client().chat.completions.create(
                **CHAT, store=True, stream=True, extra_headers={"x-request-id": request_id}
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        finally:
            assert p.stop() == 0, p.stderr
        bootstrap = settings.kafka.bootstrap or ""
        (record,) = asyncio.run(consume(bootstrap, settings.kafka.raw_topic, 1))
        assert SECRET.encode() not in record.value
        event = decode(record.value)
        assert event["request_id"] == request_id and record.key == event["event_id"].encode()
        assert event["output"]["choices"][0]["message"]["content"] == text
        assert event["stream"] is True and event["status_code"] == 200


def test_unbound_port_and_missing_upstream_are_clear_errors(tmp_path: Any) -> None:
    """No upstream: exit 2 naming proxy.upstream; a port in use: exit 1 naming the address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_PROXY")}
    out = subprocess.run([sys.executable, "-m", "auditpipe", "proxy"], capture_output=True,
                         text=True, env=env, timeout=30)  # fmt: skip
    assert out.returncode == 2 and "proxy.upstream" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "auditpipe", "proxy", "--upstream", "http://127.0.0.1:9",
             "--port", str(port)], capture_output=True, text=True, env=env, timeout=30,
        )  # fmt: skip
    assert out.returncode == 1 and f"127.0.0.1:{port}" in out.stderr
