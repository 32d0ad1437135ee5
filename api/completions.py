"""OpenAI's stored chat completions objects, rendered from stored records (pure functions).

- :func:`chat_completion`: the stored response as the client received it (a stream as the
  assembled ``chat.completion``), with ``id`` the served id and ``metadata`` the caller's
  metadata as it stands (updates applied).
- :func:`store_messages`: the request's messages as ``ChatCompletionStoreMessage`` objects
  with stable ids ``<completion id>-<index>``.
- :func:`validate_metadata`: OpenAI's limits on metadata (16 pairs, keys up to 64 characters,
  values up to 512, all strings).
"""

from __future__ import annotations

from typing import Any

from .store import Record

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio")


def chat_completion(rec: Record) -> dict[str, Any]:
    response = rec.response if isinstance(rec.response, dict) else {}
    out: dict[str, Any] = dict(response)
    out["id"] = rec.served_id
    out["object"] = "chat.completion"
    if not isinstance(out.get("created"), int):
        out["created"] = int(rec.timestamp.timestamp())
    if not isinstance(out.get("model"), str) or not out["model"]:
        out["model"] = rec.model or ""
    if not isinstance(out.get("choices"), list):
        out["choices"] = []
    out["metadata"] = rec.caller_metadata or {}
    usage = rec.envelope.get("usage")
    if out.get("usage") is None and isinstance(usage, dict):
        # a stream without include_usage: the event's counts, unless estimated by enrich
        if not rec.envelope.get("usage_estimated") and all(
            isinstance(usage.get(k), int)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        ):
            out["usage"] = usage
    return out


def _text_of(content: Any) -> tuple[str | None, list[Any] | None]:
    if content is None or isinstance(content, str):
        return content, None
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(t for t in texts if isinstance(t, str)) or None, content
    return str(content), None


def store_messages(rec: Record) -> list[dict[str, Any]]:
    request = rec.request if isinstance(rec.request, dict) else {}
    messages = request.get("messages")
    if not isinstance(messages, list):
        return []
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            message = {"role": "user", "content": message}
        content, parts = _text_of(message.get("content"))
        item: dict[str, Any] = {
            "id": f"{rec.served_id}-{i}",
            "role": message.get("role"),
            "content": content,
            "content_parts": parts,
        }
        for key in _MESSAGE_FIELDS:
            if key in message:
                item[key] = message[key]
        out.append(item)
    return out


def validate_metadata(value: Any) -> tuple[dict[str, str] | None, str | None]:
    """(metadata, None) when ``value`` is valid OpenAI metadata (None clears it), else
    (None, the reason)."""
    if value is None:
        return {}, None
    if not isinstance(value, dict):
        return None, "metadata must be an object of string keys and string values"
    if len(value) > MAX_METADATA_PAIRS:
        return None, (f"metadata has {len(value)} pairs; at most {MAX_METADATA_PAIRS} are allowed")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            return None, (
                f"metadata key {key[:20]!r}... is {len(key)} characters long; "
                f"keys may have at most {MAX_METADATA_KEY_CHARS}"
            )
        if not isinstance(item, str):
            return None, f"metadata value of {key!r} must be a string"
        if len(item) > MAX_METADATA_VALUE_CHARS:
            return None, (
                f"metadata value of {key!r} is {len(item)} characters long; "
                f"values may have at most {MAX_METADATA_VALUE_CHARS}"
            )
    return dict(value), None
