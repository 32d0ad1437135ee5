"""A step that fails on the events it is told to (for the fail-closed tests of sink steps)."""

from __future__ import annotations

from auditpipe.schemas import Event
from pydantic import Field

from auditpipe.settings import StrictModel
from auditpipe.steps import ProcessorStep


class FailOnConfig(StrictModel):
    request_id: str = Field(description="events with this request_id make the step raise")


class FailOn(ProcessorStep[FailOnConfig]):
    name = "fail_on"

    def __call__(self, event: Event) -> Event:
        if event.get("request_id") == self.config.request_id:
            raise ValueError("this step cannot handle the event")
        return event
