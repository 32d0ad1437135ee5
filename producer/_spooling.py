"""The disk overflow: opening the spool (a free slot when another process holds it) and
appending to it. Replay is the sender's (it needs Kafka)."""

from __future__ import annotations

import logging
import os
import tempfile

from auditpipe.schemas import Event

from ._queue import Queue
from ._spool import Spool, SpoolError

log = logging.getLogger("auditpipe.producer")

_SPOOL_SLOTS = 64


class Spooling(Queue):
    def _open_spool(self) -> Spool | None:
        """The spool at ``spool_dir``; when another process holds it (several server workers
        with one configuration), the first free of ``spool_dir.1`` ... ``.63``."""
        cfg = self._cfg
        directory = cfg.spool_dir or os.path.join(
            tempfile.gettempdir(), "auditpipe-spool", self.settings.kafka.raw_topic
        )
        kwargs = {"write_fn": self._spool_write_fn} if self._spool_write_fn else {}
        error: SpoolError | None = None
        for slot in range(_SPOOL_SLOTS):
            path = directory if slot == 0 else f"{directory}.{slot}"
            try:
                return Spool(path, cfg.spool_max_bytes, cfg.spool_segment_bytes, **kwargs).open()
            except SpoolError as exc:
                error = error or exc
                if "in use" not in str(exc):
                    break
        log.error("disk spool disabled: %s", error)
        return None

    def _spool_events(self, events: list[Event]) -> None:
        spool = self._spool
        assert spool is not None
        for event in events:
            self._pace()
            value = self._encode(event)
            if value is not None:
                self._spool_value(value)
        self._flush_spool()

    def _spool_value(self, value: bytes) -> None:
        assert self._spool is not None
        reason = self._spool.append(value)
        if reason is None:
            self._stats.spooled += 1
        else:
            self._stats.dropped[reason] += 1

    def _flush_spool(self) -> None:
        assert self._spool is not None
        dropped, reason = self._spool.flush()
        if dropped:
            self._stats.spooled -= dropped
            self._stats.dropped[reason or "spool_error"] += dropped
