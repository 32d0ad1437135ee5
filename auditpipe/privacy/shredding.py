"""The key part of ``auditpipe erase --user/--tenant``: deleting the subject's data keys.

When some configured sink has ``encrypt_content``, an erasure of a whole subject (``--user`` or
``--tenant``, no ``--since/--until``, every sink) also deletes the subject's data keys from the
key store, after the stores were erased: every sealed copy that could not be removed (S3
Object Lock, backups, copies auditpipe does not know about) becomes unreadable.

The keys are kept (and the receipt says why) when deleting them would destroy more than was
asked for or may be destroyed:

- the selector is not a whole subject (``--request-id``, ``--event-id``, ``--metadata``, or a
  time window): a key seals all of the subject's records;
- ``--sink`` restricts the erasure: the key is shared by every encrypting sink;
- records were kept because they are younger than ``[privacy] min_retention_days`` (or a
  store failed while that protection is on, so it is unknown whether some are).

When the keys are kept, records that a store counted as shredded are reported as skipped
(including any whose keys an earlier erasure deleted: the receipt errs towards "kept").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .erasure import Receipt
from .keys import KeyStore, open_key_store
from .selector import Selector

if TYPE_CHECKING:
    from auditpipe.settings import Settings


def encrypting_sinks(settings: Settings) -> list[str]:
    return [
        name for name, table in settings.sinks.items()
        if isinstance(table, dict) and table.get("encrypt_content")
    ]  # fmt: skip


@dataclass
class KeyShredding:
    """What the erasure does with the subject's keys (``line()`` is the receipt line)."""

    store: KeyStore
    selector: Selector
    key_ids: list[str]
    blocked: str | None = None  # why the keys are kept, decided before the erasure
    kept: str | None = None  # why the keys are kept, decided after it
    deleted: int = 0
    dry_run: bool = False

    def __post_init__(self) -> None:
        self._gone: dict[str, bool] = {}
        self._lock = threading.Lock()

    def shredded_key(self, key_id: str) -> bool:
        """Whether ``key_id`` is deleted by this erasure or already gone (thread-safe: the
        stores ask from their worker threads)."""
        if not self.blocked and key_id in self.key_ids:
            return True
        with self._lock:
            gone = self._gone.get(key_id)
            if gone is None:
                gone = self._gone[key_id] = self.store.get(key_id) is None
        return gone

    def finish(self, receipts: list[Receipt], *, protect: bool, retention_reason: str) -> None:
        """Delete the keys (not with ``dry_run``) unless the receipts say they must stay; then
        turn the receipts' shredded records into skipped ones where they were kept."""
        if self.blocked:
            self.kept = self.blocked
        elif protect and any(retention_reason in r.skipped for r in receipts):
            self.kept = (
                "records younger than [privacy] min_retention_days are sealed under them "
                "(erase again once they are old enough, or --override-retention)"
            )
        elif protect and any(r.error for r in receipts):
            self.kept = "a store failed, so records that must be kept may be sealed under them"
        elif not self.dry_run:
            self.deleted = self._delete()
        if self.kept:
            for r in receipts:
                if r.shredded:
                    why = f"S3 Object Lock (sealed, but the keys were kept: {self.kept})"
                    r.skipped[why] = r.skipped.get(why, 0) + r.shredded
                    r.shredded = 0

    def _delete(self) -> int:
        if self.selector.kind == "user":
            return self.store.delete_where(user=self.selector.value)
        return self.store.delete_where(tenant=self.selector.value)

    def line(self) -> str:
        if self.kept:
            return f"keys: {len(self.key_ids)} kept: {self.kept}"
        if self.dry_run:
            return f"keys: {len(self.key_ids)} would be deleted"
        return f"keys: {self.deleted} deleted"

    def as_dict(self) -> dict[str, Any]:
        return {"found": len(self.key_ids), "deleted": self.deleted, "kept": self.kept}

    def close(self) -> None:
        self.store.close()


def plan(
    settings: Settings, selector: Selector, *, restricted: bool, dry_run: bool
) -> KeyShredding | None:
    """The key part of an erasure, or None when no configured sink encrypts content. Opens the
    key store (a bad key store or master key fails here, before anything is erased)."""
    if not encrypting_sinks(settings):
        return None
    store = open_key_store(settings)
    blocked = None
    if selector.kind not in ("user", "tenant"):
        blocked = (
            f"--{selector.kind.replace('_', '-')} selects records, not a subject "
            "(keys are per tenant/user)"
        )
    elif selector.since_ms is not None or selector.until_ms is not None:
        blocked = "--since/--until: the keys also seal the subject's records outside the window"
    elif restricted:
        blocked = "--sink restricts the erasure; the keys are shared by every encrypting sink"
    key_ids: list[str] = []
    if selector.kind == "user":
        key_ids = store.key_ids(user=selector.value)
    elif selector.kind == "tenant":
        key_ids = store.key_ids(tenant=selector.value)
    return KeyShredding(store, selector, key_ids, blocked=blocked, dry_run=dry_run)
