"""DELETE through the erasure path: the record goes from every configured store, not only
from the PostgreSQL tables the API reads.

:func:`erasing_deleter` is the ``deleter`` ``auditpipe serve`` passes to
:func:`auditpipe.api.app.create_app` when ``[sinks.*]`` names stores beside postgres. A delete
resolves the served id to the record's event id, erases that event id (an ``event_id``
selector, :func:`auditpipe.privacy.erasure.erase_everywhere`, the same code as ``auditpipe
erase``) from every other configured store, and only when all of them succeeded deletes the
PostgreSQL rows and logs the change (one transaction, :func:`delete_completion`). A store that
fails makes the request fail with 503 and deletes nothing from PostgreSQL, so the record stays
visible and the client's retry completes the erasure (erasing is idempotent). Records a store
must keep (S3 Object Lock) are logged, not an error: the API has no way to say "partly".

With ``[privacy] min_retention_days`` set, a record younger than that is not deleted at all:
the answer is 409 (``code: "retention_required"``), naming the command that can override it
with a reason (``auditpipe erase --event-id ID --override-retention --reason TEXT``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from auditpipe.privacy.erasure import (
    ErasureFailed,
    RetentionRequired,
    erasable_stores,
    erase_everywhere,
)
from auditpipe.privacy.selector import Selector

from .store import Change, Record, Store, delete_completion

log = logging.getLogger("auditpipe.api.erasure")


def erasing_deleter(
    sinks: Mapping[str, Mapping[str, Any]], origin: str, min_retention_days: float = 0
) -> Callable[[Store, str, Change], Awaitable[Record | None]]:
    others = {name: table for name, table in sinks.items() if name != "postgres"}
    erasable_stores(others, origin)  # validate the tables now: a bad one fails start-up

    async def deleter(store: Store, ref: str, change: Change) -> Record | None:
        rec = await store.get_completion(ref)
        if rec is None:
            return None
        if min_retention_days > 0:
            kept_until = rec.timestamp + dt.timedelta(days=min_retention_days)
            if kept_until > dt.datetime.now(dt.UTC):
                raise RetentionRequired(
                    f"this record is younger than [privacy] min_retention_days "
                    f"({min_retention_days:g} days) and must be kept until "
                    f"{kept_until:%Y-%m-%dT%H:%M:%SZ}; to erase it anyway run `auditpipe erase "
                    f"--event-id {rec.event_id} --override-retention --reason TEXT`"
                )
        stores = erasable_stores(others, origin)
        try:
            receipts = await erase_everywhere(stores, Selector("event_id", rec.event_id))
        finally:
            for sink in stores.values():
                try:
                    await sink.stop()
                except Exception as exc:
                    log.warning("closing %s after an erasure: %s", type(sink).__name__, exc)
        failed = [r for r in receipts if r.error]
        if failed:
            raise ErasureFailed(
                "the record could not be erased from every store, so it was not deleted: "
                + "; ".join(f"{r.sink}: {r.error}" for r in failed)
                + " (retry the request)"
            )
        for r in receipts:
            for reason, n in r.skipped.items():
                log.warning("delete %s: %s kept %d record(s): %s", ref, r.sink, n, reason)
        return await delete_completion(store, ref, change)

    return deleter
