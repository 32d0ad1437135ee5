"""Turn one raw Kafka record into exactly one outcome: forward it, drop it, or dead-letter it.

This is the whole per-record logic of the processor worker, free of Faust, so it can be tested
on bytes. The Faust agent (``app.py``) only moves outcomes to their topics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from auditpipe.schemas import DecodeError, decode, encode

from auditpipe.dlq import dead_letter_headers
from auditpipe.steps import Step, build_chain


@dataclass(frozen=True)
class Outcome:
    """``kind`` says where the record goes; ``value`` is what to write there."""

    kind: Literal["forward", "dead_letter", "drop"]
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    reason: str = ""
    dimensions: tuple[str | None, str | None] = (None, None)  # (model, tenant) when forwarded


def process_record(
    key: bytes | None,
    value: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    steps: Sequence[Step],
) -> Outcome:
    """Decode, run ``steps`` in order, encode. Never raises: failures become dead letters."""
    try:
        event = decode(value)
    except DecodeError as exc:
        headers = dead_letter_headers("decode", exc.reason, exc, topic, partition, offset)
        return Outcome("dead_letter", key, value, headers, exc.reason)
    for step in steps:
        name = getattr(step, "__name__", type(step).__name__)
        try:
            result = step(event)
        except Exception as exc:
            headers = dead_letter_headers(
                f"step:{name}", "step_failed", exc, topic, partition, offset
            )
            return Outcome("dead_letter", key, value, headers, "step_failed")
        if result is None:
            return Outcome("drop", key, None, [], f"dropped_by:{name}")
        event = result
    try:
        encoded = encode(event)
    except Exception as exc:
        headers = dead_letter_headers("encode", "encode_failed", exc, topic, partition, offset)
        return Outcome("dead_letter", key, value, headers, "encode_failed")
    dims = (event.get("model"), event.get("tenant"))
    return Outcome("forward", key or str(event["event_id"]).encode(), encoded, dimensions=dims)


def chain_for(pipeline: dict[str, object] | None, origin: str = "settings") -> list[Step]:
    """The chain a worker runs: the configured steps.

    No separate validation step: decoding with the writer's schema already proves the input
    fits, and encoding the result proves the output does (a failure there dead-letters).
    """
    return list(build_chain(pipeline, origin))
