"""Capture the calls an application makes with the ``openai`` client (sync and async).

``wrap_openai(client, producer)`` replaces ``create`` on ``chat.completions``, ``completions``,
``embeddings`` and ``responses`` of that client instance (and returns the client). Each call
emits one event: the keyword arguments as input, the response (``model_dump``) as output, the
provider's error (status, type, message) when it raised, which then propagates unchanged. A
streamed call returns the same stream, wrapped: chunks pass through as they come and the event
(assembled output, chunk count, time to first chunk) is emitted when the stream ends or is
closed; a stream abandoned early is marked incomplete. ``with_raw_response`` and
``with_streaming_response`` are not wrapped.

This is the queue-logging ticket's OpenRouter cost-log case: point the client at any
OpenAI-compatible provider and every call is recorded, with ``usage`` for cost, without a
synchronous file write on the request path. Each event also says who answered: ``provider``
(from the client's base URL: ``openai``, ``openrouter``, ``azure``, ``anthropic``... or the
host name; ``provider=`` overrides it) and ``provider_request_id``, the provider's own id of
the call from its response headers (``x-request-id``, ``request-id``, ``apim-request-id``,
``x-amzn-requestid``), read by a response hook on the client's HTTP client while a wrapped
call runs (errors and streams included). ``openai`` is imported only by the caller.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from ._capture import Capture
from ._producer import AuditProducer

#: Response headers that carry the provider's id of a request, in order of preference.
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "apim-request-id", "x-amzn-requestid")

#: Known providers by the end of their API host name.
PROVIDERS = (
    ("api.openai.com", "openai"), ("openrouter.ai", "openrouter"), ("openai.azure.com", "azure"),
    ("anthropic.com", "anthropic"), ("groq.com", "groq"), ("together.xyz", "together"),
    ("together.ai", "together"), ("mistral.ai", "mistral"), ("deepseek.com", "deepseek"),
    ("fireworks.ai", "fireworks"), ("googleapis.com", "google"), ("x.ai", "xai"),
    ("perplexity.ai", "perplexity"), ("deepinfra.com", "deepinfra"), ("cerebras.ai", "cerebras"),
)  # fmt: skip

# The capture of the wrapped call running in this thread / task (read by the response hook).
_current: contextvars.ContextVar[Capture | None] = contextvars.ContextVar(
    "auditpipe_openai_capture", default=None
)


def provider_of(base_url: str) -> str | None:
    """The provider behind ``base_url``: a known name, else the host name."""
    host = (urlparse(base_url).hostname or "").lower()
    for suffix, name in PROVIDERS:
        if host == suffix or host.endswith("." + suffix):
            return name
    return host or None


def _request_id_of(headers: Any) -> str | None:
    for name in REQUEST_ID_HEADERS:
        value = headers.get(name) if headers is not None else None
        if value:
            return str(value)
    return None


def _note_response(response: Any) -> None:
    """httpx response hook: the provider's request id onto the running capture."""
    cap = _current.get()
    if cap is not None:
        rid = _request_id_of(getattr(response, "headers", None))
        if rid:
            cap.exchange.provider_request_id = rid


async def _anote_response(response: Any) -> None:
    _note_response(response)


def _install_hook(client: Any) -> None:
    """Add the response hook to the client's httpx client (once; harmless to other users of a
    shared httpx client: it only acts while a wrapped call runs)."""
    http = getattr(client, "_client", None)
    hooks = getattr(http, "event_hooks", None)
    if http is None or not isinstance(hooks, dict):
        return
    is_async = inspect.iscoroutinefunction(getattr(http, "send", None))
    hook = _anote_response if is_async else _note_response
    if hook in hooks.get("response", []):
        return
    http.event_hooks = {**hooks, "response": [*hooks.get("response", []), hook]}


_RESOURCES = (
    (("chat", "completions"), "chat/completions"),
    (("completions",), "completions"),
    (("embeddings",), "embeddings"),
    (("responses",), "responses"),
)
_NOT_INPUT = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})


def wrap_openai(
    client: Any,
    producer: AuditProducer,
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = True,
    provider: str | None = None,
) -> Any:
    """Wrap ``client`` (``OpenAI`` or ``AsyncOpenAI``) in place; returns it.

    ``force=False`` records only calls whose arguments say ``store=True`` (or all, when the
    producer's ``capture = "all"``). ``metadata`` is added to every event (the call's own
    ``metadata`` wins). ``provider``: the provider's name on the events (default: from the
    client's base URL).
    """
    base_path = urlparse(str(client.base_url)).path.rstrip("/")
    who = provider or provider_of(str(client.base_url))
    _install_hook(client)
    for attrs, suffix in _RESOURCES:
        resource = client
        try:
            for attr in attrs:
                resource = getattr(resource, attr)
            original = resource.create
        except AttributeError:
            continue
        if getattr(original, "__auditpipe_wrapped__", False):
            continue
        endpoint = f"{base_path}/{suffix}"
        wrapper = (
            _async_wrapper(original, producer, endpoint, metadata, force, who)
            if inspect.iscoroutinefunction(inspect.unwrap(original))
            else _sync_wrapper(original, producer, endpoint, metadata, force, who)
        )
        wrapper.__auditpipe_wrapped__ = True
        resource.create = wrapper
    return client


def _start(
    producer: AuditProducer,
    endpoint: str,
    kwargs: dict[str, Any],
    metadata: Mapping[str, str] | None,
    force: bool,
    provider: str | None,
) -> Capture:
    body = {k: v for k, v in kwargs.items() if k not in _NOT_INPUT and not _is_not_given(v)}
    meta = body.get("metadata")
    merged = {**(metadata or {}), **(meta if isinstance(meta, Mapping) else {})}
    headers = kwargs.get("extra_headers") or {}
    cap = Capture(
        producer,
        endpoint,
        body,
        metadata=merged or None,
        request_id=headers.get("x-request-id") if isinstance(headers, Mapping) else None,
        force=force,
    )
    cap.exchange.provider = provider
    return cap


def _fallback_request_id(cap: Capture, result: Any) -> None:
    """Without the hook (an unusual client): the id openai itself read (x-request-id)."""
    x = cap.exchange
    if x.provider_request_id is None:
        rid = getattr(result, "_request_id", None) or getattr(result, "request_id", None)
        if rid is None:
            rid = _request_id_of(getattr(getattr(result, "response", None), "headers", None))
        x.provider_request_id = rid if isinstance(rid, str) else None


def _is_not_given(value: Any) -> bool:
    return type(value).__name__ in ("NotGiven", "Omit")


def _fail(cap: Capture, exc: BaseException) -> None:
    _fallback_request_id(cap, exc)
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    cap.set_error(exc, status=status if isinstance(status, int) else None)
    if isinstance(body, dict):
        cap.exchange.response = {"error": body.get("error", body)}
    cap.finish(incomplete=status is None)


def _done(cap: Capture, result: Any) -> None:
    _fallback_request_id(cap, result)
    dump = getattr(result, "model_dump", None)
    cap.set_output(dump(mode="json", exclude_unset=True) if callable(dump) else result)
    cap.finish()


def _sync_wrapper(
    original: Any, producer: AuditProducer, endpoint: str, metadata: Any, force: bool,
    provider: str | None,
) -> Any:  # fmt: skip
    def create(*args: Any, **kwargs: Any) -> Any:
        cap = _start(producer, endpoint, kwargs, metadata, force, provider)
        token = _current.set(cap)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            _fail(cap, exc)
            raise
        finally:
            _current.reset(token)
        if kwargs.get("stream") is True:
            _fallback_request_id(cap, result)
            return _SyncStream(result, cap)
        _done(cap, result)
        return result

    return create


def _async_wrapper(
    original: Any, producer: AuditProducer, endpoint: str, metadata: Any, force: bool,
    provider: str | None,
) -> Any:  # fmt: skip
    async def create(*args: Any, **kwargs: Any) -> Any:
        cap = _start(producer, endpoint, kwargs, metadata, force, provider)
        token = _current.set(cap)
        try:
            result = await original(*args, **kwargs)
        except BaseException as exc:
            _fail(cap, exc)
            raise
        finally:
            _current.reset(token)
        if kwargs.get("stream") is True:
            _fallback_request_id(cap, result)
            return _AsyncStream(result, cap)
        _done(cap, result)
        return result

    return create


class _StreamBase:
    def __init__(self, stream: Any, cap: Capture) -> None:
        self._stream = stream
        self._cap = cap
        self._ended = False

    def _end(self, *, complete: bool, exc: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if exc is not None:
            self._cap.set_error(exc, status=getattr(exc, "status_code", None))
        elif self._cap.exchange.status is None:
            self._cap.exchange.status = 200
        self._cap.finish(incomplete=not complete)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _SyncStream(_StreamBase):
    """The openai ``Stream``, observed."""

    def __iter__(self) -> _SyncStream:
        return self

    def __next__(self) -> Any:
        try:
            chunk = next(self._stream)
        except StopIteration:
            self._end(complete=True)
            raise
        except BaseException as exc:
            self._end(complete=False, exc=exc)
            raise
        self._cap.add_chunk(chunk)
        return chunk

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._end(complete=False)

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_ended", True):
            self._end(complete=False)


class _AsyncStream(_StreamBase):
    """The openai ``AsyncStream``, observed."""

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self._end(complete=True)
            raise
        except BaseException as exc:
            self._end(complete=False, exc=exc)
            raise
        self._cap.add_chunk(chunk)
        return chunk

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            self._end(complete=False)

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if not getattr(self, "_ended", True):
            self._end(complete=False)
