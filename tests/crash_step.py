"""A processor step that escapes the per-record error handling (for the dead-agent test)."""

from __future__ import annotations

from auditpipe.processors import ProcessorStep
from auditpipe.schemas import Event


class AgentKiller(BaseException):
    """Not an Exception: process_record does not turn it into a dead letter."""


class CrashStep(ProcessorStep):
    name = "crash"

    def __call__(self, event: Event) -> Event:
        raise AgentKiller("the agent dies here")
