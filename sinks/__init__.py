"""Sinks (one module per store) and the runner that feeds them from Kafka."""

from .base import (
    ENTRY_POINT_GROUP,
    Batch,
    Migratable,
    PermanentSinkError,
    RetriableSinkError,
    Sink,
    SinkError,
    available_sinks,
    create_sink,
    load_sink_class,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Batch",
    "Migratable",
    "PermanentSinkError",
    "RetriableSinkError",
    "Sink",
    "SinkError",
    "available_sinks",
    "create_sink",
    "load_sink_class",
]
