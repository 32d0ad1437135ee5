"""AuditEvent schemas (``*.avsc``), the file registry and the codec."""

from .codec import (
    DecodeError,
    Event,
    EventValidationError,
    decode,
    encode,
    from_json,
    known_schema_ids,
    latest_schema_id,
    new_event,
    schema_by_id,
    to_json,
    to_json_line,
    validate,
)
from .ids import new_event_id, uuid7

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
    "schema_by_id",
    "to_json",
    "to_json_line",
    "uuid7",
    "validate",
]
