"""The KServe logger receiver: CloudEvents built and encoded by the CloudEvents SDK (binary and
structured modes, as KServe's agent sends them), posted over real HTTP to the receiver served by
uvicorn; events read from the stdout transport, and from Kafka through `auditpipe receive`."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from auditpipe.producer import AuditProducer
from auditpipe.producer.kserve import (
    CE_REQUEST,
    CE_RESPONSE,
    BadEvent,
    KServeReceiver,
    parse_events,
)
from auditpipe.schemas import decode
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from auditpipe.broker import free_port
from auditpipe.settings import ReceiverSettings, Settings, load_settings

from .asgiutil import LineSink, serve
from .conftest import wait_until
from .kafkautil import consume

T0 = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)
SOURCE = "http://localhost:9081/"
IRIS_IN = {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}
IRIS_OUT = {"predictions": [1, 1]}
CHAT_IN = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
CHAT_OUT = {"id": "c1", "object": "chat.completion", "model": "qwen",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip


def kserve_event(kind: str, ce_id: str, data: Any, *, ms: int = 0, **ext: str) -> CloudEvent:
    """An event as KServe's logger builds it (worker.go: id, type, time, the extensions)."""
    attributes: dict[str, Any] = {
        "id": ce_id, "type": CE_REQUEST if kind == "request" else CE_RESPONSE, "source": SOURCE,
        "time": T0 + datetime.timedelta(milliseconds=ms), "datacontenttype": "application/json",
        "inferenceservicename": "sklearn-iris", "namespace": "default", "component": "predictor",
        "endpoint": "default", "metadata": "{}", "recordedtime": T0.isoformat(), **ext,
    }  # fmt: skip
    return CloudEvent(attributes=attributes, data=data)


def post(url: str, event: CloudEvent, mode: str = "binary") -> httpx.Response:
    message = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    return httpx.post(url, headers=message.headers, content=message.body)


class Harness:
    def __init__(self, **receiver: Any) -> None:
        base = load_settings(env={"AUDITPIPE_PRODUCER_TRANSPORT": "stdout"})
        self.settings = base.model_copy(
            update={"receiver": ReceiverSettings(**{"pair_timeout_secs": 30.0, **receiver})}
        )
        self.sink = LineSink()
        self.producer = AuditProducer(self.settings, stream=self.sink)
        self.receiver = KServeReceiver(self.producer)

    def events(self, count: int, timeout_secs: float = 10.0) -> list[dict[str, Any]]:
        return self.sink.wait_for(count, timeout_secs)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    h.producer.start()
    try:
        yield h
    finally:
        h.producer.stop()


class TestParse:
    def test_binary_mode_percent_encoded_extensions(self) -> None:
        meta = '{"X-User":["José"]}'
        message = to_binary_event(kserve_event("request", "a1", IRIS_IN, metadata=meta))
        headers = [(k.lower().encode(), v.encode()) for k, v in message.headers.items()]
        assert any(b"%22" in v for _, v in headers)  # the SDK percent-encodes
        (event,) = parse_events(headers, message.body)
        assert (event.id, event.type, event.source) == ("a1", CE_REQUEST, SOURCE)
        assert event.ext["metadata"] == meta and orjson.loads(event.data or b"") == IRIS_IN

    def test_structured_mode_data_and_data_base64_and_batches(self) -> None:
        as_json = to_structured_event(kserve_event("response", "a2", IRIS_OUT))
        raw = kserve_event("response", "a3", b"\x00\x01binary")
        raw._attributes["datacontenttype"] = "application/octet-stream"
        as_b64 = to_structured_event(raw)
        assert b"data_base64" in as_b64.body
        ctype = [(b"content-type", b"application/cloudevents+json")]
        (e1,) = parse_events(ctype, as_json.body)
        (e2,) = parse_events(ctype, as_b64.body)
        assert e1.value == IRIS_OUT and e2.data == b"\x00\x01binary"
        batch = b"[" + as_json.body + b"," + as_b64.body + b"]"
        events = parse_events([(b"content-type", b"application/cloudevents-batch+json")], batch)
        assert [e.id for e in events] == ["a2", "a3"]

    @pytest.mark.parametrize(
        ("headers", "body", "says"),
        [
            ([(b"content-type", b"application/json")], b"{}", "no CloudEvent"),
            ([(b"ce-specversion", b"1.0"), (b"ce-type", b"t")], b"{}", "ce-id"),
            ([(b"content-type", b"application/cloudevents+json")], b"{nope", "not JSON"),
            ([(b"content-type", b"application/cloudevents+json")], b'{"id": "x"}', "source"),
        ],
    )  # fmt: skip
    def test_invalid_requests_say_why(self, headers: Any, body: bytes, says: str) -> None:
        with pytest.raises(BadEvent, match=says):
            parse_events(headers, body)


class TestPairing:
    def test_binary_pair_becomes_one_event(self, harness: Harness) -> None:
        """KServe's sklearn example: request then response, binary mode, 202 each; one event
        with input, output, latency from the event times, model and tags from the
        extensions, allowlisted metadata headers (never credentials)."""
        meta = orjson.dumps({"User-Agent": ["curl/8"], "Authorization": ["Bearer sk-x"]}).decode()
        with serve(harness.receiver) as url:
            r1 = post(url, kserve_event("request", "id-1", IRIS_IN, metadata=meta))
            r2 = post(url, kserve_event("response", "id-1", IRIS_OUT, ms=42, metadata=meta))
        assert (r1.status_code, r2.status_code) == (202, 202)
        (event,) = harness.events(1)
        assert event["input"] == IRIS_IN and event["output"] == IRIS_OUT
        assert event["request_id"] == "id-1" and event["status_code"] == 200
        assert event["endpoint"] == "/v1/models/sklearn-iris:predict"
        assert event["model"] == "sklearn-iris" and event["latency_ms"] == 42.0
        assert event["incomplete"] is False and event["error"] is None
        assert event["ts_ms"] == int(T0.timestamp() * 1000)
        assert event["headers"] == {"user-agent": "curl/8"}
        assert event["tags"]["kserve.namespace"] == "default"
        assert event["tags"]["kserve.pairing"] == "paired"
        assert event["source"]["service"] == "sklearn-iris"

    def test_structured_out_of_order_openai(self, harness: Harness) -> None:
        """Response first, request second, structured mode: paired all the same."""
        with serve(harness.receiver) as url:
            r1 = post(url, kserve_event("response", "id-2", CHAT_OUT, ms=7), "structured")
            r2 = post(url, kserve_event("request", "id-2", CHAT_IN), "structured")
        assert (r1.status_code, r2.status_code) == (202, 202)
        (event,) = harness.events(1)
        assert event["endpoint"] == "/v1/chat/completions" and event["model"] == "qwen"
        assert event["input"] == CHAT_IN and event["output"] == CHAT_OUT
        assert event["usage"]["total_tokens"] == 2 and event["latency_ms"] == 7.0

    def test_mixed_modes_oip_v2_and_sse(self, harness: Harness) -> None:
        """Binary request + structured response (OIP v2 payloads); an SSE response body (an
        OpenAI stream through KServe) is assembled."""
        v2_in = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        y = {"name": "y", "shape": [1], "datatype": "INT64", "data": [1]}
        v2_out = {"model_name": "sklearn-iris", "outputs": [y]}
        sse = b"".join(b"data: " + orjson.dumps({"object": "chat.completion.chunk", "model": "q",
                       "choices": [{"index": 0, "delta": {"content": w}}]}) + b"\n\n"
                       for w in ("a", "b")) + b"data: [DONE]\n\n"  # fmt: skip
        with serve(harness.receiver) as url:
            post(url, kserve_event("request", "id-3", v2_in))
            post(url, kserve_event("response", "id-3", v2_out), "structured")
            post(url, kserve_event("request", "id-4", {**CHAT_IN, "stream": True}), "structured")
            post(url, kserve_event("response", "id-4", sse))
        by_id = {e["request_id"]: e for e in harness.events(2)}
        assert by_id["id-3"]["endpoint"] == "/v2/models/sklearn-iris/infer"
        assert by_id["id-3"]["output"] == v2_out
        assert by_id["id-4"]["stream"] is True and by_id["id-4"]["chunk_count"] == 2
        assert by_id["id-4"]["output"]["choices"][0]["message"]["content"] == "ab"

    def test_lone_halves_time_out_as_incomplete_and_late_ones_still_count(self) -> None:
        """A request without response (KServe drops non-200 answers) and a response without
        request are recorded, incomplete, after the timeout; a response that comes after its
        request timed out is recorded too."""
        h = Harness(pair_timeout_secs=0.4)
        with h.producer, serve(h.receiver) as url:
            post(url, kserve_event("request", "lone-req", IRIS_IN))
            post(url, kserve_event("response", "lone-resp", IRIS_OUT))
            events = h.events(2)
            post(url, kserve_event("response", "lone-req", IRIS_OUT))
            late = h.events(3)[2]
        by_id = {e["request_id"]: e for e in events}
        req = by_id["lone-req"]
        assert req["incomplete"] is True and req["status_code"] is None
        assert req["error"]["type"] == "no_response" and req["output"] is None
        assert req["input"] == IRIS_IN and req["tags"]["kserve.pairing"] == "request_only"
        resp = by_id["lone-resp"]
        assert resp["incomplete"] is True and resp["input"] is None
        assert resp["output"] == IRIS_OUT and resp["error"] is None
        assert late["request_id"] == "lone-req" and late["output"] == IRIS_OUT
        assert late["event_id"] != req["event_id"]
        assert h.receiver.stats["late_responses"] == 1

    def test_non_200_outcome_from_a_statuscode_extension(self, harness: Harness) -> None:
        error = {"error": {"message": "bad input", "type": "invalid_request_error"}}
        with serve(harness.receiver) as url:
            post(url, kserve_event("request", "id-5", CHAT_IN))
            post(url, kserve_event("response", "id-5", error, statuscode="400"))
        (event,) = harness.events(1)
        assert event["status_code"] == 400 and event["error"]["message"] == "bad input"

    def test_duplicates_dropped_and_ids_deterministic(self) -> None:
        """A redelivered half is dropped; the same pair in another receiver gets the same
        event id (the sinks dedupe redeliveries across restarts)."""
        ids = []
        for _ in range(2):
            h = Harness()
            with h.producer, serve(h.receiver) as url:
                for kind, data in (("request", IRIS_IN), ("request", IRIS_IN),
                                   ("response", IRIS_OUT), ("response", IRIS_OUT)):  # fmt: skip
                    post(url, kserve_event(kind, "dup", data))
                (event,) = h.events(1)
                assert h.producer.flush(5) and len(h.sink.events) == 1
            assert h.receiver.stats["duplicates"] == 2
            ids.append(event["event_id"])
        assert ids[0] == ids[1]

    def test_memory_bound_evicts_the_oldest_and_stop_flushes_the_rest(self) -> None:
        """Beyond max_pending, the oldest waiting half is recorded at once (counted); at
        shutdown the ones still waiting are recorded: none is lost."""
        h = Harness(max_pending=2)
        with h.producer, serve(h.receiver) as url:
            for i in range(3):
                post(url, kserve_event("request", f"r{i}", IRIS_IN))
            (first,) = h.events(1)
            assert first["request_id"] == "r0" and h.receiver.stats["evicted"] == 1
            h.receiver.close()
            events = h.events(3)
        assert sorted(e["request_id"] for e in events) == ["r0", "r1", "r2"]
        assert h.receiver.stats["flushed_at_stop"] == 2

    def test_answers_errors_health_and_metrics(self, harness: Harness) -> None:
        h = Harness(max_body_bytes=1024)
        with h.producer, serve(h.receiver) as url:
            assert httpx.post(url, json={"not": "an event"}).status_code == 400
            big = kserve_event("request", "big", {"x": "y" * 4000})
            assert post(url, big).status_code == 413
            assert httpx.get(f"{url}/healthz").status_code == 200
            post(url, kserve_event("request", "m1", IRIS_IN))
            metrics = httpx.get(f"{url}/metrics").text
        assert 'auditpipe_stage_events_total{kind="requests",stage="receiver"} 1.0' in metrics
        assert 'auditpipe_events_received_total{stage="receiver"} 1.0' in metrics
        assert 'auditpipe_events_dropped_total{reason="too_large",stage="receiver"} 1.0' in metrics
        assert 'auditpipe_events_dropped_total{reason="rejected",stage="receiver"} 1.0' in metrics
        assert 'auditpipe_pending{stage="receiver"} 1.0' in metrics
        assert 'auditpipe_events_received_total{stage="producer"}' in metrics


def test_receive_cli_to_kafka(settings: Settings) -> None:
    """`auditpipe receive` as a process with the Kafka transport: a pair posted in both modes
    arrives on the raw topic as one Avro event; SIGTERM records a lone half before exiting."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AUDITPIPE_", "DYN_"))},
           "AUDITPIPE_KAFKA_BOOTSTRAP": settings.kafka.bootstrap or "",
           "AUDITPIPE_KAFKA_RAW_TOPIC": settings.kafka.raw_topic}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "auditpipe", "receive", "--port", str(port)],
                            env=env, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def listening() -> bool:
        assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, 20, "the receiver to listen")
        assert post(url, kserve_event("response", "k1", CHAT_OUT, ms=5)).status_code == 202
        assert post(url, kserve_event("request", "k1", CHAT_IN), "structured").status_code == 202
        assert post(url, kserve_event("request", "k2", IRIS_IN)).status_code == 202
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    records = asyncio.run(consume(settings.kafka.bootstrap or "", settings.kafka.raw_topic, 2))
    by_id = {e["request_id"]: e for e in (decode(r.value) for r in records)}
    assert by_id["k1"]["output"] == CHAT_OUT and by_id["k1"]["incomplete"] is False
    assert by_id["k2"]["incomplete"] is True and by_id["k2"]["error"]["type"] == "no_response"
