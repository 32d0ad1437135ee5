"""Erasing one subject's records from every configured store, and proving what was done.

The contract a store implements (the built-in file, s3, mongodb and postgres sinks do)::

    class Erasable(Protocol):
        async def count(self, selector) -> int        # records selected; touches nothing
        async def erase(self, selector) -> EraseResult

``erase`` is idempotent (a second run finds nothing and is a no-op) and safe to interrupt: a
store never holds a state in which a record that must stay is gone (files and objects are
rewritten beside the original and swapped in atomically; PostgreSQL deletes in committed
chunks). A rerun after an interruption finishes the job. It is called on a started sink.

:func:`erase_everywhere` runs one selector over many stores and returns a :class:`Receipt` per
store: matched, erased, skipped with the reason (records younger than ``[privacy]
min_retention_days``; objects under S3 Object Lock; a store that failed, with its error).
:func:`erasure_event` turns receipts into the AuditEvent (``log_type = "erasure"``) that audits
the erasure itself: the selector only as an HMAC (key from ``AUDITPIPE_ERASURE_HASH_KEY``),
counts, time, operator and reason; never the erased content.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from auditpipe.errors import AuditpipeError, ConfigError

from .selector import Selector

HASH_KEY_ENV = "AUDITPIPE_ERASURE_HASH_KEY"
DAY_MS = 86_400_000


class ErasureFailed(AuditpipeError):
    """A store could not erase (the message names it and the error)."""


class RetentionRequired(AuditpipeError):
    """The record is younger than ``[privacy] min_retention_days``: it must be kept."""


@dataclass
class EraseResult:
    """What a store's ``erase`` did. ``skipped`` maps a reason to the records it kept."""

    erased: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    #: records left in place (S3 Object Lock) but sealed under keys this erasure deletes
    shredded: int = 0

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n


@runtime_checkable
class Erasable(Protocol):
    async def count(self, selector: Selector) -> int: ...

    async def erase(self, selector: Selector) -> EraseResult: ...


@dataclass
class Receipt:
    """One store's part of an erasure."""

    sink: str
    matched: int = 0
    erased: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    dry_run: bool = False
    shredded: int = 0  # see EraseResult.shredded

    @property
    def complete(self) -> bool:
        return self.error is None and not self.skipped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.error is not None:
            return f"{self.sink}: FAILED: {self.error}"
        if self.dry_run:
            young = sum(self.skipped.values())
            extra = f" ({young} would be kept: {', '.join(self.skipped)})" if young else ""
            return f"{self.sink}: {self.matched} record(s) match{extra}"
        kept = "; ".join(f"{n} skipped: {why}" for why, n in self.skipped.items())
        shred = f", shredded {self.shredded} (content key deleted)" if self.shredded else ""
        return f"{self.sink}: matched {self.matched}, erased {self.erased}{shred}" + (
            f"; {kept}" if kept else ""
        )


def retention_reason(min_days: float) -> str:
    return f"younger than [privacy] min_retention_days ({min_days:g} days)"


async def erase_everywhere(
    stores: Mapping[str, Erasable],
    selector: Selector,
    *,
    dry_run: bool = False,
    min_retention_days: float = 0,
    override_retention: bool = False,
    now_ms: int | None = None,
    shredded_key: Callable[[str], bool] | None = None,
) -> list[Receipt]:
    """Erase (or with ``dry_run`` only count) ``selector``'s records in every store, in parallel.

    Records younger than ``min_retention_days`` are kept (counted as skipped with the reason)
    unless ``override_retention``. A store that raises gets a receipt with ``error`` set; the
    others go on. ``shredded_key(key_id)``: whether a data key is gone or deleted by the
    caller after this (see :mod:`auditpipe.privacy.shredding`); a store that cannot remove a
    record sealed under such keys only (S3 Object Lock) counts it as shredded, not skipped.
    """
    for store in stores.values():
        if hasattr(store, "shredded_key"):
            store.shredded_key = shredded_key
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    protect = min_retention_days > 0 and not override_retention
    allowed = selector.narrowed(now_ms - int(min_retention_days * DAY_MS)) if protect else selector

    async def one(name: str, store: Erasable) -> Receipt:
        receipt = Receipt(name, dry_run=dry_run)
        try:
            receipt.matched = await store.count(selector)
            if dry_run:
                if protect and receipt.matched:
                    young = receipt.matched - await store.count(allowed)
                    if young:
                        receipt.skipped[retention_reason(min_retention_days)] = young
                return receipt
            if protect and receipt.matched:
                young = receipt.matched - await store.count(allowed)
                if young:
                    receipt.skipped[retention_reason(min_retention_days)] = young
            result = await store.erase(allowed) if receipt.matched else EraseResult()
            receipt.erased = result.erased
            receipt.shredded = result.shredded
            for reason, n in result.skipped.items():
                receipt.skipped[reason] = receipt.skipped.get(reason, 0) + n
        except Exception as exc:
            receipt.error = f"{type(exc).__name__}: {exc}"
        return receipt

    return list(await asyncio.gather(*(one(n, s) for n, s in stores.items())))


def hash_key(env: Mapping[str, str] | None = None) -> bytes:
    env = os.environ if env is None else env
    key = env.get(HASH_KEY_ENV, "")
    if not key:
        raise ConfigError(
            f"{HASH_KEY_ENV} is not set: the erasure event records the selector only as an "
            f"HMAC, keyed by it; set {HASH_KEY_ENV} to a secret kept with your audit records "
            "(e.g. `openssl rand -hex 32`)"
        )
    return key.encode()


def erasure_event(
    selector: Selector,
    receipts: Sequence[Receipt],
    *,
    key: bytes,
    operator: str,
    reason: str | None,
    override_retention: bool = False,
    source_service: str = "auditpipe-erase",
    keys_deleted: int | None = None,
) -> dict[str, Any]:
    """The AuditEvent recording an erasure (JSON rendering), with no erased content: the
    selector's kind and HMAC, the window, per-store counts, the operator and the reason."""
    from auditpipe.schemas import new_event

    metadata = {
        "selector_kind": selector.kind,
        "selector_hmac": selector.hashed(key),
        "operator": operator,
        "matched": str(sum(r.matched for r in receipts)),
        "erased": str(sum(r.erased for r in receipts)),
        "skipped": str(sum(sum(r.skipped.values()) for r in receipts)),
        "shredded": str(sum(r.shredded for r in receipts)),
        "failed_sinks": ",".join(r.sink for r in receipts if r.error) or "",
        "override_retention": "true" if override_retention else "false",
    }
    if reason:
        metadata["reason"] = reason
    if keys_deleted is not None:
        metadata["keys_deleted"] = str(keys_deleted)
    if selector.since_ms is not None:
        metadata["since_ms"] = str(selector.since_ms)
    if selector.until_ms is not None:
        metadata["until_ms"] = str(selector.until_ms)
    for r in receipts:
        metadata[f"sink.{r.sink}"] = (
            f"error: {r.error}" if r.error else
            f"matched={r.matched} erased={r.erased} skipped={sum(r.skipped.values())}"
            + (f" shredded={r.shredded}" if r.shredded else "")
        )  # fmt: skip
    return new_event(
        log_type="erasure",
        endpoint="auditpipe erase",
        method="DELETE",
        status_code=200 if all(r.complete for r in receipts) else 207,
        metadata=metadata,
        source={"service": source_service, "instance": None},
    )


def operator_name(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    """``--operator``, else ``AUDITPIPE_OPERATOR``, else the login name."""
    env = os.environ if env is None else env
    if explicit:
        return explicit
    if env.get("AUDITPIPE_OPERATOR"):
        return env["AUDITPIPE_OPERATOR"]
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# the configured stores


def erasable_stores(
    sinks: Mapping[str, Mapping[str, Any]], origin: str, names: Sequence[str] = ()
) -> dict[str, Any]:
    """The configured sinks (``[sinks.NAME]`` tables) that hold records, built but not
    started; ``names`` restricts them (an unknown or non-erasable name is a ConfigError)."""
    from auditpipe.sinks.base import create_sink

    chosen = list(names) or list(sinks)
    out: dict[str, Any] = {}
    for name in chosen:
        if name not in sinks:
            raise ConfigError(
                f"{origin}: --sink {name}: no [sinks.{name}] table in the settings "
                f"(configured: {', '.join(sinks) or 'none'})"
            )
        sink = create_sink(name, sinks, origin)
        if not isinstance(sink, Erasable):
            if names:
                raise ConfigError(f"--sink {name}: the {name} sink holds no records to erase")
            continue
        out[name] = sink
    return out
