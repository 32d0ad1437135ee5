"""sample: keep a deterministic fraction of events, by rule.

The decision hashes ``seed`` and the value of ``key`` (default ``request_id``): the same key
always gets the same decision, so related events stay together across workers and restarts.
Rules are tried in order and the first that matches sets the rate; ``default_rate`` otherwise.
Events matching ``keep_when`` are never sampled out. Kept events carry the applied
``sample_rate`` (so counts can be scaled back up); sampled-out events are dropped.
"""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Literal

from auditpipe.schemas import Event
from pydantic import Field, model_validator

from auditpipe.settings import StrictModel

from .steps import ProcessorStep, record_step

Condition = Literal["error", "store", "redacted"]
_KEEP_WHEN_DEFAULT: tuple[Condition, ...] = ("error", "redacted")


class SampleRule(StrictModel):
    model: str | None = Field(None, description="glob on the model name")
    endpoint: str | None = Field(None, description="glob on the endpoint path")
    tenant: str | None = Field(None, description="glob on the tenant")
    status: str | None = Field(None, description="'2xx', '5xx' or an exact code like '404'")
    rate: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _has_a_condition(self) -> SampleRule:
        if not any((self.model, self.endpoint, self.tenant, self.status)):
            raise ValueError("a rule needs at least one of model, endpoint, tenant, status")
        return self

    def matches(self, event: Event) -> bool:
        if self.model and not fnmatch.fnmatchcase(str(event.get("model") or ""), self.model):
            return False
        if self.endpoint and not fnmatch.fnmatchcase(
            str(event.get("endpoint") or ""), self.endpoint
        ):
            return False
        if self.tenant and not fnmatch.fnmatchcase(str(event.get("tenant") or ""), self.tenant):
            return False
        if self.status:
            code = event.get("status_code")
            if code is None:
                return False
            if self.status.endswith("xx"):
                return str(code)[0] == self.status[0]
            return str(code) == self.status
        return True


class SampleConfig(StrictModel):
    key: str = Field("request_id", description="event field whose value is hashed")
    seed: str = "auditpipe"
    default_rate: float = Field(1.0, ge=0, le=1)
    rules: list[SampleRule] = Field(default_factory=list)
    keep_when: list[Condition] = Field(default_factory=lambda: list(_KEEP_WHEN_DEFAULT))


class SampleStep(ProcessorStep[SampleConfig]):
    name = "sample"
    version = "1"

    def rate_for(self, event: Event) -> float:
        cfg = self.config
        for rule in cfg.rules:
            if rule.matches(event):
                return rule.rate
        return cfg.default_rate

    def keep_always(self, event: Event) -> bool:
        for cond in self.config.keep_when:
            if cond == "error" and (event.get("error") or (event.get("status_code") or 0) >= 400):
                return True
            if cond == "store" and event.get("store"):
                return True
            if cond == "redacted" and any(
                p.get("step") == "redact" and p.get("action") == "redacted"
                for p in event.get("processing", ())
            ):
                return True
        return False

    def position(self, event: Event) -> float:
        """Where the event's key falls in [0, 1): the deterministic coin."""
        cfg = self.config
        value = str(event.get(cfg.key) or event.get("event_id"))
        digest = hashlib.sha256(f"{cfg.seed}\x00{value}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def __call__(self, event: Event) -> Event | None:
        if self.keep_always(event):
            rate, why = 1.0, "kept_always"
        else:
            rate = self.rate_for(event)
            if self.position(event) >= rate:
                return None
            why = "kept"
        out = record_step(event, self.name, self.version, why)
        out["sample_rate"] = rate
        return out
