"""Records true to what happened: ``store`` as the request asked, the enrich step's default
tenant/user sources reachable with default settings, and Open Inference Protocol v2 exchanges
(KServe-style, through the real middleware) in their PostgreSQL columns."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import psycopg
from auditpipe.processors.enrich import EnrichStep
from auditpipe.producer import AuditMiddleware, AuditProducer, capture
from auditpipe.sinks.postgres import PostgresSink
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from auditpipe.demo import create_demo_app

from .asgiutil import LineSink, serve
from .test_middleware import CHAT, stdout_settings


def captured(app: Any, requests: list[dict[str, Any]], **producer: Any) -> list[dict[str, Any]]:
    """Send ``requests`` (httpx.post keyword arguments plus ``path``) through AuditMiddleware
    over real HTTP; return the events of the stdout transport, in order."""
    sink = LineSink()
    prod = AuditProducer(stdout_settings(**producer), stream=sink).start()
    try:
        with serve(AuditMiddleware(app, prod)) as url:
            for req in requests:
                r = httpx.post(url + req.pop("path"), **req)
                assert r.status_code < 500, r.text
        assert prod.flush(10)
    finally:
        prod.stop()
    return list(sink.events)


class TestStore:
    def test_store_says_what_the_request_asked(self) -> None:
        """capture = "all" records unstored requests too, with store: false."""
        path = "/v1/chat/completions"
        events = captured(
            create_demo_app(),
            [
                {"path": path, "json": CHAT},
                {"path": path, "json": {**CHAT, "store": True}},
                {"path": path, "json": {**CHAT, "store": False}},
                {"path": path, "json": CHAT, "headers": {"x-auditpipe-store": "true"}},
            ],
            capture="all",
        )
        assert [e["store"] for e in events] == [False, True, False, True]

    def test_an_explicit_capture_records_store_false_unless_asked(self) -> None:
        sink = LineSink()
        prod = AuditProducer(stdout_settings(), stream=sink).start()
        try:
            with capture(prod, "/rpc", {"prompt": "x"}) as c:
                c.set_output({"text": "y"})
            with capture(prod, "/rpc", {"prompt": "x", "store": True}) as c:
                c.set_output({"text": "y"})
            assert prod.flush(10)
        finally:
            prod.stop()
        assert [e["store"] for e in sink.events] == [False, True]


class TestEnrichDefaults:
    def test_tenant_and_user_headers_reach_the_enrich_step_with_default_settings(self) -> None:
        """The default header allowlist keeps x-tenant-id and x-user-id, which the default
        tenant_from / user_from read."""
        (event,) = captured(
            create_demo_app(),
            [
                {
                    "path": "/v1/chat/completions",
                    "json": {**CHAT, "store": True},
                    "headers": {"x-tenant-id": "acme", "x-user-id": "u-42"},
                }
            ],
        )
        enriched = EnrichStep()(event)
        assert (enriched["tenant"], enriched["user"]) == ("acme", "u-42")


def kserve_app() -> Starlette:
    """A KServe-style v2 server: infer (with and without a version) and generate."""

    async def infer(request: Request) -> JSONResponse:
        body = await request.json()
        name = request.path_params["name"]
        data = body["inputs"][0]["data"]
        answer: dict[str, Any] = {
            "model_name": name,
            "id": body.get("id"),
            "parameters": {"elapsed_ms": 1.5},
            "outputs": [
                {"name": o["name"], "shape": [len(data)], "datatype": "INT64",
                 "data": [int(x) % 3 for x in data]}
                for o in body.get("outputs") or [{"name": "predict"}]
            ],
        }  # fmt: skip
        if "version" not in request.path_params:  # with a version in the path, KServe omits it
            answer["model_version"] = "3"
        return JSONResponse(answer)

    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        name = request.path_params["name"]
        text = body["text_input"].upper()
        return JSONResponse({"model_name": name, "model_version": "1", "text_output": text})

    return Starlette(
        routes=[
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/generate", generate, methods=["POST"]),
        ]
    )


V2_REQUEST = {
    "id": "42",
    "parameters": {"store": True, "binary_data_output": False},
    "inputs": [
        {"name": "input-0", "shape": [2, 2], "datatype": "FP32", "data": [6.8, 2.8, 4.8, 1.4]}
    ],
    "outputs": [{"name": "predict", "parameters": {"binary_data": False}}],
}


class TestOpenInferenceProtocolInPostgres:
    def test_v2_requests_and_responses_fill_their_columns(self, pg_dsn: str) -> None:
        """infer with a version in the path, infer without, generate: through AuditMiddleware
        (default capture paths) and the postgres sink into the seed's columns."""
        events = captured(
            kserve_app(),
            [
                {"path": "/v2/models/iris/versions/7/infer", "json": V2_REQUEST},
                {"path": "/v2/models/iris/infer", "json": V2_REQUEST},
                {"path": "/v2/models/gpt2/generate",
                 "json": {"text_input": "hi", "parameters": {"store": True, "max_tokens": 5}}},
            ],
        )  # fmt: skip
        assert [e["endpoint"] for e in events] == [
            "/v2/models/iris/versions/7/infer", "/v2/models/iris/infer", "/v2/models/gpt2/generate"
        ]  # fmt: skip
        schema = f"s_{uuid.uuid4().hex[:10]}"

        async def load() -> None:
            sink = PostgresSink.from_mapping(
                {"dsn": pg_dsn, "schema_name": schema, "auto_migrate": True}
            )
            await sink.start()
            try:
                await sink.write(events)
            finally:
                await sink.stop()

        asyncio.run(load())
        with psycopg.connect(pg_dsn) as conn:
            requests = conn.execute(
                f"SELECT model, parameters, inputs, outputs FROM {schema}.requests ORDER BY id"
            ).fetchall()
            responses = conn.execute(
                f"SELECT model_name, model_version, parameters, outputs "
                f"FROM {schema}.responses ORDER BY id"
            ).fetchall()
        infer = (
            "iris",
            V2_REQUEST["parameters"],
            V2_REQUEST["inputs"],
            V2_REQUEST["outputs"],
        )
        assert requests == [
            infer,
            infer,
            ("gpt2", {"store": True, "max_tokens": 5}, "hi", None),
        ]
        predict = [{"name": "predict", "shape": [4], "datatype": "INT64", "data": [0, 2, 1, 1]}]
        assert [(r[0], r[1], r[3]) for r in responses] == [
            ("iris", "7", predict),  # the version from the /versions/{version} segment
            ("iris", "3", predict),  # the version the response gave
            ("gpt2", "1", "HI"),
        ]
        assert responses[0][2]["elapsed_ms"] == 1.5 and responses[0][2]["status_code"] == 200
        assert "latency_ms" in responses[0][2]
