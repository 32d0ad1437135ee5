"""AuditEvent schemas (``*.avsc``), the manifest, the wire format and the codec."""

from .codec import (
    EventValidationError,
    decode,
    encode,
    from_json,
    new_event,
    to_json,
    to_json_line,
    validate,
)
from .ids import new_event_id, uuid7
from .manifest import known_schema_ids, latest_schema_id, schema_by_id
from .wire import DecodeError, Event, peek_event_id, schema_id_of

__all__ = [
    "DecodeError",
    "Event",
    "EventValidationError",
    "decode",
    "encode",
    "from_json",
    "known_schema_ids",
    "latest_schema_id",
    "new_event",
    "new_event_id",
    "peek_event_id",
    "schema_by_id",
    "schema_id_of",
    "to_json",
    "to_json_line",
    "uuid7",
    "validate",
]
