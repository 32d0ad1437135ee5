"""Dead letters: the headers every stage puts on a record it sends to ``auditpipe.dlq``.

The record's key and value are the original bytes, untouched; the headers say which stage
gave up on it, why, and where it came from, so it can be inspected and replayed.
"""

from __future__ import annotations

H_STAGE = "auditpipe.dlq.stage"  # "decode", "step:<name>", "encode", "sink:<name>", "ingest"
H_REASON = "auditpipe.dlq.reason"  # short tag: bad_magic, truncated, step_failed, rejected...
H_ERROR_TYPE = "auditpipe.dlq.error_type"
H_ERROR_MESSAGE = "auditpipe.dlq.error_message"
H_TOPIC = "auditpipe.dlq.topic"
H_PARTITION = "auditpipe.dlq.partition"
H_OFFSET = "auditpipe.dlq.offset"

MAX_MESSAGE_CHARS = 1024


def dead_letter_headers(
    stage: str, reason: str, error: BaseException, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    message = str(error)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    return [
        (H_STAGE, stage.encode()),
        (H_REASON, reason.encode()),
        (H_ERROR_TYPE, type(error).__name__.encode()),
        (H_ERROR_MESSAGE, message.encode()),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
    ]


def headers_dict(
    headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...],
) -> dict[str, str]:
    """Decode record headers into ``{name: text}`` (for tests and tools)."""
    return {k: v.decode("utf-8", "replace") for k, v in headers}
