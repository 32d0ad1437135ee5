"""A step that makes some events larger than Kafka takes (for the processors' permanent-rejection
test): events whose request_id starts with ``inflate-`` get a 2 MB metadata value."""

from __future__ import annotations

from auditpipe.schemas import Event

from auditpipe.settings import StrictModel
from auditpipe.steps import ProcessorStep


class InflateConfig(StrictModel):
    pass


class Inflate(ProcessorStep[InflateConfig]):
    name = "inflate"

    def __call__(self, event: Event) -> Event:
        if str(event.get("request_id") or "").startswith("inflate-"):
            return {**event, "metadata": {**(event.get("metadata") or {}), "big": "x" * 2_000_000}}
        return event
