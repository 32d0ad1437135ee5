"""mongodb: one document per event in a collection, with PyMongo's async API.

Each document is the event's JSON rendering with ``_id = event_id`` and ``ts``, a BSON date
from ``ts_ms`` (what the time index and the TTL index use). A batch is one unordered
``insert_many``: a duplicate key (the event was already stored: redelivery) counts as success,
so redelivery is harmless.

Errors: network errors, timeouts, write-concern errors and not-primary errors are retriable;
a document the server rejects (validation failure, too large) is permanent for that event.

Indexes (created at start when ``create_indexes`` is on): ``ts`` (a TTL index expiring
documents after ``retention_days`` when set), ``model``, ``request_id`` and
``metadata.KEY`` for each of ``metadata_index_keys``.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from auditpipe.schemas import Event
from pydantic import Field

from auditpipe.settings import StrictModel

from .base import Batch, PermanentSinkError, RetriableSinkError, Sink

if TYPE_CHECKING:
    from auditpipe.privacy.erasure import EraseResult
    from auditpipe.privacy.selector import Selector

DUPLICATE_KEY = 11000
# Rejections of the document itself; retrying the same document cannot succeed.
PERMANENT_CODES = {2, 9, 17, 52, 55, 56, 57, 10334, 121, 17419, 17420}


class MongoConfig(StrictModel):
    uri: str = "mongodb://127.0.0.1:27017"
    database: str = "auditpipe"
    collection: str = "events"
    write_concern_w: int | str = Field(
        "majority", description='nodes to acknowledge, or "majority"'
    )
    write_concern_journal: bool | None = Field(True, description="wait for the journal")
    server_selection_timeout_secs: float = Field(10.0, gt=0)
    operation_timeout_secs: float = Field(
        30.0, gt=0, description="per insert, write-concern wait and retries included"
    )
    create_indexes: bool = True
    metadata_index_keys: list[str] = Field(default_factory=list)
    retention_days: float | None = Field(None, gt=0, description="TTL on ts; None keeps all")


def to_document(event: Event) -> dict[str, Any]:
    doc = dict(event)
    doc["_id"] = event["event_id"]
    doc["ts"] = dt.datetime.fromtimestamp(event["ts_ms"] / 1000, dt.UTC)
    return doc


class MongoSink(Sink[MongoConfig]):
    """Unordered bulk inserts keyed by event_id into ``database.collection``."""

    name = "mongodb"

    def __init__(self, config: MongoConfig | None = None) -> None:
        super().__init__(config)
        self._client: Any = None
        self._collection: Any = None

    async def start(self) -> None:
        import pymongo
        from pymongo import AsyncMongoClient
        from pymongo.errors import PyMongoError
        from pymongo.write_concern import WriteConcern

        c = self.config
        self._client = AsyncMongoClient(
            c.uri,
            serverSelectionTimeoutMS=int(c.server_selection_timeout_secs * 1000),
            timeoutMS=int(c.operation_timeout_secs * 1000),
            tz_aware=True,
        )
        # No wtimeout: with timeoutMS set, the driver bounds the write-concern wait by it.
        wc = WriteConcern(w=c.write_concern_w, j=c.write_concern_journal)
        self._collection = self._client[c.database].get_collection(c.collection, write_concern=wc)
        if c.create_indexes:
            try:
                with pymongo.timeout(c.server_selection_timeout_secs):  # fail fast at start
                    await self.ensure_indexes()
            except PyMongoError as exc:
                await self.stop()
                raise RetriableSinkError(
                    f"mongodb sink: cannot create indexes (sinks.mongodb.uri): {exc}"
                ) from exc

    def index_models(self) -> list[Any]:
        from pymongo import ASCENDING, IndexModel

        c = self.config
        ts: dict[str, Any] = {"name": "ts"}
        if c.retention_days is not None:
            ts = {"name": "ts_ttl", "expireAfterSeconds": int(c.retention_days * 86400)}
        models = [
            IndexModel([("ts", ASCENDING)], **ts),
            IndexModel([("model", ASCENDING), ("ts", ASCENDING)], name="model_ts"),
            IndexModel([("request_id", ASCENDING)], name="request_id"),
        ]
        for key in c.metadata_index_keys:
            models.append(IndexModel([(f"metadata.{key}", ASCENDING)], name=f"metadata.{key}"))
        return models

    def _connect(self) -> None:
        """The client and collection without the start-up index work (erasure uses it)."""
        from pymongo import AsyncMongoClient
        from pymongo.write_concern import WriteConcern

        c = self.config
        self._client = AsyncMongoClient(
            c.uri,
            serverSelectionTimeoutMS=int(c.server_selection_timeout_secs * 1000),
            timeoutMS=int(c.operation_timeout_secs * 1000),
            tz_aware=True,
        )
        wc = WriteConcern(w=c.write_concern_w, j=c.write_concern_journal)
        self._collection = self._client[c.database].get_collection(c.collection, write_concern=wc)

    async def ensure_indexes(self) -> None:
        await self._collection.create_indexes(self.index_models())

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def write(self, batch: Batch) -> None:
        from pymongo.errors import BulkWriteError, DocumentTooLarge, PyMongoError

        if self._collection is None:
            raise RetriableSinkError("mongodb sink: not started")
        if not batch:
            return
        try:
            await self._collection.insert_many([to_document(e) for e in batch], ordered=False)
        except BulkWriteError as exc:
            details = exc.details or {}
            errors = [e for e in details.get("writeErrors", []) if e.get("code") != DUPLICATE_KEY]
            if details.get("writeConcernErrors"):
                raise RetriableSinkError(
                    f"mongodb sink: write concern: {details['writeConcernErrors'][:1]}"
                ) from exc
            if not errors:
                return  # only duplicates: those events are already stored
            if any(e.get("code") in PERMANENT_CODES for e in errors):
                raise PermanentSinkError(f"mongodb sink: rejected: {errors[0]}") from exc
            raise RetriableSinkError(f"mongodb sink: {errors[0]}") from exc
        except DocumentTooLarge as exc:
            raise PermanentSinkError(f"mongodb sink: document too large: {exc}") from exc
        except PyMongoError as exc:
            raise RetriableSinkError(f"mongodb sink: {type(exc).__name__}: {exc}") from exc

    # -- erasure (auditpipe.privacy.erasure.Erasable) -----------------------------------------
    # No start() needed. One delete_many: the server deletes document by document, so an
    # interrupted erasure leaves some selected documents, which a rerun deletes.

    async def count(self, selector: Selector) -> int:
        if self._collection is None:
            self._connect()
        return int(await self._collection.count_documents(selector_filter(selector)))

    async def erase(self, selector: Selector) -> EraseResult:
        from auditpipe.privacy.erasure import EraseResult

        if self._collection is None:
            self._connect()
        result = await self._collection.delete_many(selector_filter(selector))
        return EraseResult(erased=int(result.deleted_count))


def selector_filter(selector: Selector) -> dict[str, Any]:
    """``selector`` as a MongoDB filter on the stored documents (``ts_ms`` is kept as is)."""
    kind = selector.kind
    clauses: list[dict[str, Any]] = []
    if kind in ("user", "tenant"):
        clauses.append({"$or": [{kind: selector.value}, {f"metadata.{kind}": selector.value}]})
    elif kind == "request_id":
        clauses.append({"request_id": selector.value})
    elif kind == "event_id":
        clauses.append({"_id": selector.value})
    elif kind == "metadata":
        clauses.extend({f"metadata.{k}": v} for k, v in selector.pairs)
    window: dict[str, int] = {}
    if selector.since_ms is not None:
        window["$gte"] = selector.since_ms
    if selector.until_ms is not None:
        window["$lt"] = selector.until_ms
    if window:
        clauses.append({"ts_ms": window})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}
