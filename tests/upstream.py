"""A plain OpenAI-compatible upstream for the proxy tests (not wrapped by auditpipe).

The demo app's chat completions, plus behaviours chosen by the request's ``model``:

- ``slow-stream``: 500 SSE chunks, 20 ms apart; notes in ``state`` how many it sent and
  whether it saw the client (the proxy) disconnect;
- ``fail-500``: a 500 with an OpenAI error body;
- ``gzip``: the demo answer, gzip-compressed (``content-encoding: gzip``);
- ``sleepy``: answers after 3 s;
- ``cut``: two SSE chunks, then the connection is dropped (an exception in the app).

``/echo`` answers with what arrived: method, raw path, query, headers (in order), body length.
Every request's headers are also kept in ``state["requests"]``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

from auditpipe.demo import create_demo_app


class Upstream:
    def __init__(self) -> None:
        self.demo = create_demo_app()
        self.state: dict[str, Any] = {"requests": [], "slow_sent": 0, "slow_disconnected": False}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.demo(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        self.state["requests"].append({"path": scope["path"], "headers": headers})
        if scope["path"].startswith("/echo"):
            await _json(send, 200, {
                "method": scope["method"],
                "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                "query": scope.get("query_string", b"").decode("latin-1"),
                "headers": headers,
                "body_bytes": len(body),
            })  # fmt: skip
            return
        model = None
        if scope["path"] == "/v1/chat/completions":
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None
        if model == "slow-stream":
            await self._slow_stream(receive, send)
        elif model == "fail-500":
            error = {"message": "the model crashed", "type": "server_error", "param": None,
                     "code": None}  # fmt: skip
            await _json(send, 500, {"error": error})
        elif model == "cut":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
            for i in range(2):
                chunk = _chunk("cut", f"part{i} ")
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            raise RuntimeError("upstream crashed mid-stream")
        elif model in ("gzip", "sleepy"):
            if model == "sleepy":
                await asyncio.sleep(3)
            patched = json.dumps({**json.loads(body), "model": "demo-echo-1"}).encode()
            status, resp_headers, payload = await _call(self.demo, scope, patched)
            if model == "gzip":
                payload = gzip.compress(payload)
                resp_headers = [(k, v) for k, v in resp_headers if k != b"content-length"] + [
                    (b"content-encoding", b"gzip"),
                    (b"content-length", str(len(payload)).encode()),
                ]
            await send({"type": "http.response.start", "status": status, "headers": resp_headers})
            await send({"type": "http.response.body", "body": payload})
        else:
            await self.demo(scope, _replay(body), send)

    async def _slow_stream(self, receive: Any, send: Any) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                if (await receive())["type"] == "http.disconnect":
                    gone.set()
                    return

        task = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        try:
            for i in range(500):
                if gone.is_set():
                    self.state["slow_disconnected"] = True
                    return
                await send({"type": "http.response.body", "body": _chunk("slow-stream", f"w{i} "),
                            "more_body": True})  # fmt: skip
                self.state["slow_sent"] = i + 1
                await asyncio.sleep(0.02)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        finally:
            task.cancel()


def _chunk(model: str, text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    payload = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [choice]}  # fmt: skip
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _json(send: Any, status: int, value: Any) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # the client stays connected
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _call(app: Any, scope: Any, body: bytes) -> tuple[int, list[Any], bytes]:
    """Run ``app`` for one request; (status, headers, body) it answered."""
    out: dict[str, Any] = {"body": b""}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], list(message.get("headers", []))
        else:
            out["body"] += message.get("body", b"")

    await app(scope, _replay(body), send)
    return out["status"], out["headers"], out["body"]
