"""auditpipe's own log lines: one setup for every command, the Faust worker and uvicorn.

``[logging]`` (or ``AUDITPIPE_LOG`` / ``AUDITPIPE_LOG_FORMAT``)::

    format = "json"                              # or "text" (the default)
    level = "info,auditpipe.sinks=debug,aiokafka=warning"
    utc = true                                   # false: local time with its UTC offset

``level`` is a default level and ``logger=level`` pairs (Dynamo's ``DYN_LOG`` style); a
logger's level applies to its children (``auditpipe.sinks`` covers ``auditpipe.sinks.runner``).
Levels: ``debug``, ``info``, ``warning`` (``warn``), ``error``, ``critical``, ``off``.

A JSON line holds ``time`` (ISO 8601, milliseconds), ``level``, ``logger``, ``message``,
``pid``, and ``trace_id`` / ``request_id`` when the record has them: passed with
``extra={"trace_id": ...}`` or bound for a block of code with :func:`bind_ids` (a contextvar,
so it follows asyncio tasks). An exception's traceback is in ``exception``.

:func:`setup` installs one handler on the root logger and removes the others, so what a
library logs (Faust, aiokafka, uvicorn: run uvicorn with ``log_config=None``) comes out in the
same format. It may be called again (settings loaded after the command line was parsed).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO, Any, Protocol

import orjson


class LoggingConfig(Protocol):
    """What :func:`setup` reads: ``auditpipe.settings.LoggingSettings`` (``[logging]``)."""

    @property
    def format(self) -> str: ...
    @property
    def level(self) -> str | None: ...
    @property
    def utc(self) -> bool: ...


LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
ID_FIELDS = ("trace_id", "request_id")

_ids: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "auditpipe_log_ids", default=None
)
_configured: set[str] = set()  # loggers whose level setup() set (reset on the next call)


def parse_level_spec(spec: str) -> tuple[int | None, dict[str, int]]:
    """``"info,auditpipe.sinks=debug"`` -> (INFO, {"auditpipe.sinks": DEBUG}).

    Raises ValueError naming the part that is not a level.
    """
    default: int | None = None
    per_logger: dict[str, int] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        name, sep, level = part.rpartition("=")
        name, level = name.strip(), level.strip().lower()
        if level not in LEVELS:
            raise ValueError(
                f"{level or part!r} in {spec!r} is not a level; use one of "
                f"{', '.join(k for k in LEVELS if k not in ('trace', 'fatal'))}, optionally "
                "with logger=level pairs (info,auditpipe.sinks=debug)"
            )
        if sep and not name:
            raise ValueError(f"{part!r} in {spec!r} names no logger (logger=level)")
        if sep:
            per_logger[name] = LEVELS[level]
        else:
            default = LEVELS[level]
    return default, per_logger


@contextlib.contextmanager
def bind_ids(**ids: str | None) -> Iterator[None]:
    """Put ``trace_id`` / ``request_id`` on every record logged inside the block."""
    current = dict(_ids.get() or {})
    current.update({k: v for k, v in ids.items() if v})
    token = _ids.set(current)
    try:
        yield
    finally:
        _ids.reset(token)


class _IdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        bound = _ids.get()
        if bound:
            for key, value in bound.items():
                if not getattr(record, key, None):
                    setattr(record, key, value)
        return True


def _timestamp(created: float, utc: bool) -> str:
    if utc:
        t = dt.datetime.fromtimestamp(created, dt.UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    t = dt.datetime.fromtimestamp(created).astimezone()
    return t.isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def __init__(self, utc: bool = True) -> None:
        super().__init__()
        self.utc = utc

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record.created, self.utc),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process or os.getpid(),
        }
        for key in ID_FIELDS:
            value = getattr(record, key, None)
            if value:
                line[key] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message [trace_id=... request_id=...]``."""

    def __init__(self, utc: bool = True) -> None:
        super().__init__()
        self.utc = utc

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{k}={getattr(record, k)}" for k in ID_FIELDS if getattr(record, k, None))
        text = (
            f"{_timestamp(record.created, self.utc)} {record.levelname:<7} {record.name}: "
            f"{record.getMessage()}{' [' + ids + ']' if ids else ''}"
        )
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(
    config: LoggingConfig | None = None,
    default_level: str = "warning",
    override: str | None = None,
    stream: IO[str] | None = None,
) -> None:
    """Configure the root logger from ``config`` (``[logging]``).

    ``default_level``: when ``config.level`` is unset (``info`` for long-running commands).
    ``override``: a level spec from the command line (``--log-level``), over ``config.level``.
    """
    fmt = config.format if config is not None else "text"
    utc = config.utc if config is not None else True
    spec = override or (config.level if config is not None else None) or default_level
    default, per_logger = parse_level_spec(spec)
    if default is None:
        default, _ = parse_level_spec(default_level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(utc) if fmt == "json" else TextFormatter(utc))
    handler.addFilter(_IdFilter())
    root.addHandler(handler)
    root.setLevel(default if default is not None else logging.WARNING)
    for name in _configured - set(per_logger):
        logging.getLogger(name).setLevel(logging.NOTSET)
    _configured.clear()
    for name, level in per_logger.items():
        logging.getLogger(name).setLevel(level)
        _configured.add(name)
    # Libraries that install handlers of their own would print twice or in their format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "faust", "mode", "aiokafka"):
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            lib.removeHandler(h)
        lib.propagate = True
