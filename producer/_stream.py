"""Server-sent events: parse a captured stream and assemble the response it amounts to.

``assemble(endpoint, events)`` turns the ``data:`` payloads of an OpenAI-style stream into the
object a non-streaming call would have returned: chat chunks become one ``chat.completion``
(message content, refusal, tool calls and legacy function calls concatenated per choice, the
last ``finish_reason``, usage when a chunk carried it); text-completion chunks become one
``text_completion``; a Responses stream becomes its final ``response`` object. Anything else is
kept as the list of chunks. Pure functions, run on the producer's sender thread.
"""

from __future__ import annotations

from typing import Any

import orjson


def parse_sse(data: bytes) -> tuple[list[Any], bool]:
    """(JSON payloads of the ``data:`` fields in order, whether ``[DONE]`` was seen).

    Non-JSON payloads are kept as strings; a torn final event (no blank line) is still parsed.
    """
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    out: list[Any] = []
    done = False
    for block in text.split(b"\n\n"):
        parts = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None
                 for line in block.split(b"\n")]  # fmt: skip
        lines = [p for p in parts if p is not None]
        if not lines:
            continue
        payload = b"\n".join(lines)
        if payload.strip() == b"[DONE]":
            done = True
            continue
        try:
            out.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            out.append(payload.decode("utf-8", "replace"))
    return out, done


def assemble(chunks: list[Any]) -> Any:
    """The aggregated final output of ``chunks`` (see the module docstring)."""
    objects = [c for c in chunks if isinstance(c, dict)]
    kinds = {c.get("object") for c in objects}
    if "chat.completion.chunk" in kinds:
        return _chat(objects)
    if "text_completion" in kinds:
        return _text(objects)
    if any(str(c.get("type", "")).startswith("response.") for c in objects):
        return _responses(objects)
    return {"object": "stream", "chunks": chunks}


def _concat(target: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        target[key] = (target.get(key) or "") + value
    else:
        target[key] = value


def _chat(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    tools: dict[int, dict[int, dict[str, Any]]] = {}
    usage = None
    for chunk in chunks:
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if chunk.get(key) is not None:
                out[key] = chunk[key]
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0)
            choice = choices.setdefault(
                idx,
                {"index": idx, "message": {"role": "assistant", "content": None},
                 "finish_reason": None, "logprobs": None},
            )  # fmt: skip
            msg = choice["message"]
            delta = ch.get("delta") or {}
            if delta.get("role"):
                msg["role"] = delta["role"]
            _concat(msg, "content", delta.get("content"))
            _concat(msg, "refusal", delta.get("refusal"))
            fc = delta.get("function_call")
            if isinstance(fc, dict):
                slot = msg.setdefault("function_call", {"name": "", "arguments": ""})
                _concat(slot, "name", fc.get("name"))
                _concat(slot, "arguments", fc.get("arguments"))
            for tc in delta.get("tool_calls") or ():
                per = tools.setdefault(idx, {})
                slot = per.setdefault(
                    tc.get("index", len(per)),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if tc.get("id"):
                    slot["id"] = tc["id"]
                if tc.get("type"):
                    slot["type"] = tc["type"]
                fn = tc.get("function") or {}
                _concat(slot["function"], "name", fn.get("name"))
                _concat(slot["function"], "arguments", fn.get("arguments"))
            if ch.get("finish_reason") is not None:
                choice["finish_reason"] = ch["finish_reason"]
            lp = ch.get("logprobs")
            if isinstance(lp, dict):
                acc = choice["logprobs"] or {}
                for key in ("content", "refusal"):
                    if lp.get(key):
                        acc[key] = (acc.get(key) or []) + list(lp[key])
                choice["logprobs"] = acc
    for idx, per in tools.items():
        choices[idx]["message"]["tool_calls"] = [per[i] for i in sorted(per)]
    out["choices"] = [choices[i] for i in sorted(choices)]
    if usage is not None:
        out["usage"] = usage
    return out


def _text(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"object": "text_completion"}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None:
                out[key] = chunk[key]
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for ch in chunk.get("choices") or ():
            idx = ch.get("index", 0)
            choice = choices.setdefault(
                idx, {"index": idx, "text": "", "finish_reason": None, "logprobs": None}
            )
            _concat(choice, "text", ch.get("text"))
            if ch.get("finish_reason") is not None:
                choice["finish_reason"] = ch["finish_reason"]
    out["choices"] = [choices[i] for i in sorted(choices)]
    return out


def _responses(chunks: list[dict[str, Any]]) -> Any:
    final = None
    text = ""
    for chunk in chunks:
        if isinstance(chunk.get("response"), dict):
            final = chunk["response"]  # created/in_progress/completed carry the whole object
        if chunk.get("type") == "response.output_text.delta" and isinstance(
            chunk.get("delta"), str
        ):
            text += chunk["delta"]
    if final is None:
        return {"object": "response", "status": "incomplete", "output_text": text}
    if final.get("status") not in ("completed", "failed", "incomplete", "cancelled"):
        final = {**final, "status": "incomplete", "output_text": text}
    return final
