"""The state the producer's layers share (:class:`ProducerState`), set by
``AuditProducer.__init__``. The producer is split by job, each layer a class on top of the
previous one: pacing (sharing the GIL with the request path, waiting), the queue (building and
encoding what ``emit()`` queued), the spool (the disk overflow), the sender (the thread, Kafka
and stdout), and ``AuditProducer`` (the public API).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import IO, Any

from auditpipe.schemas import Event

from auditpipe.settings import ProducerSettings, Settings

from ._spool import Spool, WriteFn
from ._stats import ProducerStats

#: An item of the queue: a ready event, or a function that builds one (None: not captured).
Item = Event | Callable[[], Event | None]


class ProducerState:
    settings: Settings
    enabled: bool
    _cfg: ProducerSettings
    _stream: IO[str] | None
    _spool_write_fn: WriteFn | None
    _max_queue: int
    _buf: collections.deque[Item]
    _stats: ProducerStats
    _pending: dict[int, tuple[float, list[bytes]]]  # aiokafka batches in flight
    _in_flight: int  # events in those batches
    _last_progress: float
    _rr: int
    _last_yield: float
    _request_seen: float  # perf_counter() of the request path's last activity
    _defer_since: float | None
    _defer_backlog: int
    _source: dict[str, Any] | None
    _schema_id: int
    _redact: Callable[[Event], Event | None] | None
    _seq: int
    _generation: int
    _spool: Spool | None
    _kafka_up: bool
    _accepting: bool
    _idle: bool
    _loop: asyncio.AbstractEventLoop | None
    _wake: asyncio.Event | None
    _thread: threading.Thread | None
    _ready: threading.Event
    _lock: threading.Lock
    _space: threading.Condition
    _blocked: int
    _busy: bool = False
