"""Which records an erasure (or a retention run) removes.

A :class:`Selector` is one kind of subject and a value, optionally narrowed to a capture-time
window (``since`` inclusive, ``until`` exclusive, both on the event's ``ts_ms``):

- ``user`` / ``tenant``: the event's ``user`` / ``tenant`` field (set by the enrich step from
  ``metadata.user`` / ``x-user-id`` and the like), *or* the caller metadata key of the same
  name, so records captured before enrichment (or with enrich off) are found too;
- ``request_id``: the event's ``request_id``;
- ``event_id``: the event's ``event_id``;
- ``metadata``: every given caller-metadata pair must match (``metadata.K == V``);
- ``all``: every record (retention uses it with ``until`` = the cut-off).

Every store translates the same selector into its own query (SQL, a MongoDB filter) or, where
it has to read records back (files, S3 objects), calls :meth:`Selector.matches`; a test pins
that the translations agree with ``matches``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson

from auditpipe.errors import ConfigError

Kind = Literal["user", "tenant", "request_id", "event_id", "metadata", "all"]
KINDS: tuple[str, ...] = ("user", "tenant", "request_id", "event_id", "metadata", "all")


class SelectorError(ConfigError):
    """The selector is malformed (no subject, two kinds, an empty value)."""


@dataclass(frozen=True)
class Selector:
    kind: Kind
    value: str = ""
    pairs: tuple[tuple[str, str], ...] = ()  # kind == "metadata"
    since_ms: int | None = None
    until_ms: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SelectorError(f"unknown selector kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind == "metadata":
            if not self.pairs or any(not k for k, _ in self.pairs):
                raise SelectorError("--metadata needs at least one KEY=VALUE with a key")
        elif self.kind != "all" and not self.value:
            raise SelectorError(f"--{self.kind.replace('_', '-')} needs a non-empty value")

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def everything(cls, until_ms: int | None = None) -> Selector:
        return cls("all", until_ms=until_ms)

    def narrowed(self, until_ms: int | None) -> Selector:
        """The same subject, with ``until`` moved earlier to ``until_ms`` (never later)."""
        if until_ms is None:
            return self
        until = until_ms if self.until_ms is None else min(self.until_ms, until_ms)
        return replace(self, until_ms=until)  # since >= until: an empty window, selects nothing

    # -- evaluation ---------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.pairs)

    def in_window(self, ts_ms: Any) -> bool:
        if self.since_ms is None and self.until_ms is None:
            return True
        if not isinstance(ts_ms, int):
            return False
        if self.since_ms is not None and ts_ms < self.since_ms:
            return False
        return not (self.until_ms is not None and ts_ms >= self.until_ms)

    def matches(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` (the JSON rendering) is selected: the reference every store's own
        query must agree with."""
        if not self.in_window(event.get("ts_ms")):
            return False
        meta = event.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        if self.kind == "all":
            return True
        if self.kind in ("user", "tenant"):
            return event.get(self.kind) == self.value or meta.get(self.kind) == self.value
        if self.kind in ("request_id", "event_id"):
            return event.get(self.kind) == self.value
        return all(meta.get(k) == v for k, v in self.pairs)

    # -- describing ---------------------------------------------------------------------------

    def canonical(self) -> bytes:
        """A stable byte rendering (what the erasure event's HMAC is computed over)."""
        return orjson.dumps(
            {"kind": self.kind, "value": self.value, "metadata": dict(sorted(self.pairs)),
             "since_ms": self.since_ms, "until_ms": self.until_ms},
            option=orjson.OPT_SORT_KEYS,
        )  # fmt: skip

    def hashed(self, key: bytes) -> str:
        """HMAC-SHA256 of the subject (kind, value, pairs), hex: lets an auditor who knows the
        key and the subject confirm an erasure without the event naming the person."""
        subject = orjson.dumps(
            {"kind": self.kind, "value": self.value, "metadata": dict(sorted(self.pairs))},
            option=orjson.OPT_SORT_KEYS,
        )
        return hmac.new(key, subject, hashlib.sha256).hexdigest()

    def describe(self) -> str:
        """A human rendering for prompts and receipts (names the subject: not for the event)."""
        if self.kind == "all":
            what = "every record"
        elif self.kind == "metadata":
            what = "metadata " + ", ".join(f"{k}={v}" for k, v in self.pairs)
        else:
            what = f"{self.kind} {self.value!r}"
        window = []
        if self.since_ms is not None:
            window.append(f"since {self.since_ms}")
        if self.until_ms is not None:
            window.append(f"until {self.until_ms}")
        return what + (f" ({', '.join(window)} ms)" if window else "")
