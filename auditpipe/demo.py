"""A deterministic OpenAI-compatible server for demos and tests (a fake model, no weights).

``POST /v1/chat/completions`` answers with a reply computed from the last user message, real
token counts (whitespace words) in ``usage``, and supports ``stream: true`` (SSE chunks, one per
word, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk).
``GET /v1/models`` lists the fake models. Malformed requests get OpenAI-shaped 400 errors.
With ``tools`` in the request and a last user message starting with ``call ``, the model calls
the first tool (``finish_reason: "tool_calls"``, arguments ``{"text": ...}``), streamed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from auditpipe.producer import AuditProducer

MODELS = ("demo-echo-1", "demo-echo-large")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    return JSONResponse(body, status_code=status)


def reply_for(model: str, messages: list[dict[str, Any]]) -> str:
    """The fake model: deterministic in (model, messages)."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    content = last.get("content") if last else ""
    if isinstance(content, list):  # content parts
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    digest = hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()[:8]
    return f"[{model}#{digest}] You said: {content}"


def _count_tokens(text: str) -> int:
    return len(text.split())


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(_count_tokens(str(m.get("content") or "")) for m in messages)


async def chat_completions(request: Request) -> Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "request body must be a JSON object")
    model = body.get("model")
    if model not in MODELS:
        return _error(
            404 if isinstance(model, str) else 400, f"model {model!r} does not exist", "model"
        )
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        return _error(400, "messages must be a non-empty array of objects", "messages")
    text = reply_for(model, messages)
    created = int(time.time())
    ident = "chatcmpl-" + hashlib.sha256(f"{created}{text}{id(body)}".encode()).hexdigest()[:24]
    usage = {
        "prompt_tokens": _prompt_tokens(messages),
        "completion_tokens": _count_tokens(text),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    tool_call = _tool_call(body, messages, text)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _stream(ident, created, model, text, usage if include_usage else None, tool_call),
            media_type="text/event-stream",
        )
    if tool_call is not None:
        message: dict[str, Any] = {
            "role": "assistant", "content": None, "refusal": None, "tool_calls": [tool_call]
        }  # fmt: skip
        finish = "tool_calls"
    else:
        message = {"role": "assistant", "content": text, "refusal": None}
        finish = "stop"
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
            "usage": usage,
            "system_fingerprint": "fp_auditpipe_demo",
        }
    )


def _tool_call(
    body: dict[str, Any], messages: list[dict[str, Any]], text: str
) -> dict[str, Any] | None:
    tools = body.get("tools")
    last: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    content = last.get("content")
    if not isinstance(tools, list) or not tools or not isinstance(content, str):
        return None
    if not content.startswith("call "):
        return None
    name = str(((tools[0] or {}).get("function") or {}).get("name") or "tool")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return {
        "id": f"call_{digest}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps({"text": content[5:]})},
    }


async def _stream(
    ident: str,
    created: int,
    model: str,
    text: str,
    usage: dict[str, int] | None,
    tool_call: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    def chunk(
        delta: dict[str, Any], finish: str | None, extra: dict[str, Any] | None = None
    ) -> bytes:
        payload: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if extra:
            payload.update(extra)
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    if tool_call is not None:
        args = tool_call["function"]["arguments"]
        head = {**tool_call, "index": 0, "function": {**tool_call["function"], "arguments": ""}}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [head]}, None)
        for i in range(0, len(args), 8):
            piece = {"index": 0, "function": {"arguments": args[i : i + 8]}}
            yield chunk({"tool_calls": [piece]}, None)
        yield chunk({}, "tool_calls")
    else:
        yield chunk({"role": "assistant", "content": ""}, None)
        words = text.split(" ")
        for i, word in enumerate(words):
            yield chunk({"content": word if i == 0 else " " + word}, None)
        yield chunk({}, "stop")
    if usage is not None:
        yield b"data: " + json.dumps(
            {"id": ident, "object": "chat.completion.chunk", "created": created,
             "model": model, "choices": [], "usage": usage}
        ).encode() + b"\n\n"  # fmt: skip
    yield b"data: [DONE]\n\n"


async def list_models(request: Request) -> Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "auditpipe"} for m in MODELS]
    return JSONResponse({"object": "list", "data": data})


def create_demo_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
        ]
    )


@contextlib.asynccontextmanager
async def serving_demo(
    producer: AuditProducer, host: str = "127.0.0.1", port: int = 0, name: str = "demo-server"
) -> AsyncIterator[int]:
    """Serve the demo app wrapped in ``AuditMiddleware(producer)`` with uvicorn (its logging
    routed through auditpipe's, no access log); yields the bound port once the server accepts
    connections, and stops it on exit. Used by ``dev``, ``demo`` and ``soak``."""
    import uvicorn

    from auditpipe.producer import AuditMiddleware

    config = uvicorn.Config(
        AuditMiddleware(create_demo_app(), producer),
        host=host, port=port, log_config=None, access_log=False, lifespan="off",
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(), name=name)
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"{name} exited during start-up")
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1] if server.servers else port
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
