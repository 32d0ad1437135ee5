"""The ``auditpipe serve`` ASGI app: OpenAI's stored chat completions API and the web viewer.

Routes (every one but ``/healthz`` needs a key when keys are configured; see ``auth.py``)::

    GET    /v1/chat/completions                     list (model, metadata[K]=V, after, limit, order)
    GET    /v1/chat/completions/{id}                retrieve
    POST   /v1/chat/completions/{id}                update metadata (write key)
    DELETE /v1/chat/completions/{id}                delete (write key)
    GET    /v1/chat/completions/{id}/messages       the request's messages (after, limit, order)
    GET    /  /records/{event_id}  /changes         the web viewer (HTML)
    GET    /healthz                                 200 when the database answers

Errors on ``/v1`` have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from auditpipe.privacy.erasure import ErasureFailed, RetentionRequired

from .auth import KeyRing, Principal
from .completions import chat_completion, store_messages, validate_metadata
from .store import Change, Record, Store, delete_completion

log = logging.getLogger("auditpipe.api")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_METADATA_PARAM = re.compile(r"^metadata\[(.+)\]$")

Deleter = Callable[[Store, str, Change], Awaitable[Record | None]]


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code,
        )  # fmt: skip

    def response(self) -> Response:
        body = {
            "error": {
                "message": self.message, "type": self.type, "param": self.param,
                "code": self.code,
            }
        }  # fmt: skip
        headers = {"www-authenticate": 'Bearer realm="auditpipe"'} if self.status == 401 else None
        return ORJSONResponse(body, status_code=self.status, headers=headers)


def not_found(ref: str) -> ApiError:
    return ApiError(404, f"No chat completion found with id '{ref}'.", code="not_found")


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, got {raw!r}", param="limit") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}, got {value}", param="limit")
    return value


def _descending(request: Request) -> bool:
    order = request.query_params.get("order") or "asc"
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
    return order == "desc"


def _metadata_filter(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        match = _METADATA_PARAM.match(key)
        if match:
            out[match.group(1)] = value
        elif key == "metadata":
            raise ApiError(400, "filter metadata as metadata[KEY]=VALUE", param="metadata")
    return out


def _page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


class Api:
    """The route handlers, bound to one store, key ring and deleter."""

    def __init__(self, store: Store, keys: KeyRing, deleter: Deleter) -> None:
        self.store, self.keys, self.deleter = store, keys, deleter

    def principal(self, request: Request, write: bool = False) -> Principal:
        principal = self.keys.authenticate(request.headers.get("authorization"))
        if principal is None:
            provided = "authorization" in request.headers
            raise ApiError(
                401,
                "Incorrect API key provided."
                if provided
                else ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."),
                code="invalid_api_key",
            )
        if write and not principal.can_write:
            raise ApiError(
                403,
                "This API key may only read: updates and deletes need a key from [serve] api_keys.",
                code="insufficient_permissions",
            )
        return principal

    @staticmethod
    def change(request: Request, principal: Principal) -> Change:
        client = request.client.host if request.client else None
        agent = request.headers.get("user-agent")
        return Change(
            actor=principal.actor,
            client=" ".join(p for p in (client, agent) if p) or None,
            request_id=request.headers.get("x-request-id"),
        )

    async def list_completions(self, request: Request) -> Response:
        self.principal(request)
        model = request.query_params.get("model") or None
        after = request.query_params.get("after") or None
        limit, descending = _limit(request), _descending(request)
        metadata = _metadata_filter(request)
        try:
            records, more = await self.store.list_completions(
                model=model, metadata=metadata, after=after, limit=limit, descending=descending
            )
        except LookupError:
            raise ApiError(
                400, f"after: no chat completion found with id '{after}'", param="after"
            ) from None
        return ORJSONResponse(_page([chat_completion(r) for r in records], more))

    async def completion(self, request: Request) -> Response:
        ref = request.path_params["completion_id"]
        if request.method == "GET":
            self.principal(request)
            rec = await self.store.get_completion(ref)
        elif request.method == "POST":
            principal = self.principal(request, write=True)
            metadata = await self._update_body(request)
            rec = await self.store.update_metadata(ref, metadata, self.change(request, principal))
        else:  # DELETE
            principal = self.principal(request, write=True)
            rec = await self.deleter(self.store, ref, self.change(request, principal))
            if rec is None:
                raise not_found(ref)
            return ORJSONResponse(
                {"object": "chat.completion.deleted", "id": rec.served_id, "deleted": True}
            )
        if rec is None:
            raise not_found(ref)
        return ORJSONResponse(chat_completion(rec))

    @staticmethod
    async def _update_body(request: Request) -> dict[str, str]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - {"metadata"})
        if unknown:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: {', '.join(unknown)} "
                "(only metadata can be updated)",
                param=unknown[0],
            )
        if "metadata" not in body:
            raise ApiError(400, "Missing required parameter: 'metadata'.", param="metadata",
                           code="missing_required_parameter")  # fmt: skip
        metadata, problem = validate_metadata(body["metadata"])
        if metadata is None:
            raise ApiError(400, f"Invalid 'metadata': {problem}", param="metadata",
                           code="invalid_metadata")  # fmt: skip
        return metadata

    async def messages(self, request: Request) -> Response:
        self.principal(request)
        ref = request.path_params["completion_id"]
        limit, descending = _limit(request), _descending(request)
        after = request.query_params.get("after") or None
        rec = await self.store.get_completion(ref)
        if rec is None:
            raise not_found(ref)
        items = store_messages(rec)
        if descending:
            items.reverse()
        if after is not None:
            ids = [m["id"] for m in items]
            if after not in ids:
                raise ApiError(400, f"after: no message '{after}' in '{ref}'", param="after")
            items = items[ids.index(after) + 1 :]
        return ORJSONResponse(_page(items[:limit], len(items) > limit))

    async def healthz(self, request: Request) -> Response:
        try:
            await self.store.ping()
        except Exception as exc:
            return ORJSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return ORJSONResponse({"status": "ok"})


def _wrap(handler: Callable[[Request], Awaitable[Response]]) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except RetentionRequired as exc:
            return ApiError(409, str(exc), code="retention_required").response()
        except ErasureFailed as exc:
            log.warning("erasure failed: %s", exc)
            return ApiError(503, str(exc), type="server_error",
                            code="store_unavailable").response()  # fmt: skip
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.OperationalError | psycopg.errors.QueryCanceled):
                log.warning("store unavailable: %s", exc)
                return ApiError(503, f"the store is unavailable: {exc}", type="server_error",
                                code="store_unavailable").response()  # fmt: skip
            log.exception("internal error")
            return ApiError(500, "internal error (logged by the server)", type="server_error",
                            code="internal_error").response()  # fmt: skip

    return endpoint


def create_app(
    store: Store,
    keys: KeyRing,
    *,
    page_size: int = 50,
    deleter: Deleter = delete_completion,
    manage_store: bool = True,
) -> Starlette:
    """The app over ``store`` (opened and closed by the app's lifespan unless
    ``manage_store`` is false). ``deleter`` performs DELETE (default: delete_completion)."""
    from . import viewer

    api = Api(store, keys, deleter)
    pages = viewer.Viewer(store, keys, page_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_store:
            await store.open()
        try:
            yield
        finally:
            if manage_store:
                await store.close()

    async def openai_404(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if request.url.path.startswith("/v1/"):
            method = request.method
            message = (
                f"Invalid URL ({method} {request.url.path})" if status == 404
                else f"Method {method} is not allowed on {request.url.path}"
            )  # fmt: skip
            return ApiError(status, message).response()
        return await viewer.error_page(request, status)

    routes = [
        Route("/v1/chat/completions", _wrap(api.list_completions), methods=["GET"]),
        Route("/v1/chat/completions/{completion_id}", _wrap(api.completion),
              methods=["GET", "POST", "DELETE"]),
        Route("/v1/chat/completions/{completion_id}/messages", _wrap(api.messages),
              methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        *pages.routes(),
    ]  # fmt: skip
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: openai_404},
    )
