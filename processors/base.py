"""Processor step plumbing: the step base class, the registry and the configured chain.

A step is a verb: a class with a pydantic ``Config`` (unknown keys rejected) whose instances are
callables ``event -> event | None`` (``None`` drops the event). Steps are pure: no I/O, no
clocks other than timestamps they record, no shared mutable state. Raising dead-letters the
event. Steps are registered under the entry point group ``auditpipe.processors``.

Settings::

    [pipeline]
    steps = ["enrich", "redact", "sample"]   # the default chain, in order
    [pipeline.redact]                        # each step's own table (optional)
    ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar

from auditpipe.schemas import Event
from pydantic import Field

from auditpipe.errors import ConfigError
from auditpipe.settings import StrictModel, validate_model

ENTRY_POINT_GROUP = "auditpipe.processors"
DEFAULT_CHAIN = ("enrich", "redact", "sample")

Step = Callable[[Event], Event | None]


class ProcessorStep:
    """Base class of configurable steps. Subclasses set ``name``, ``version`` and ``Config``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StrictModel]] = StrictModel

    def __init__(self, config: StrictModel | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @property
    def __name__(self) -> str:  # used in dead-letter headers ("step:<name>")
        return self.name

    def __call__(self, event: Event) -> Event | None:  # pragma: no cover - abstract
        raise NotImplementedError


class PipelineConfig(StrictModel):
    steps: list[str] = Field(default_factory=lambda: list(DEFAULT_CHAIN))


def available_steps() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_step_class(name: str) -> type[ProcessorStep]:
    """A step by entry point name, or by import path ``package.module:Class``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"pipeline.steps: cannot import {name!r}: {exc}") from None
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            names = ", ".join(sorted(available_steps())) or "none"
            raise ConfigError(f"pipeline.steps: unknown step {name!r}; installed steps: {names}")
        cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, ProcessorStep)):
        raise ConfigError(f"entry point {name!r} is not an auditpipe.processors step class")
    return cls


def build_chain(
    pipeline: Mapping[str, Any] | None, origin: str = "settings"
) -> list[ProcessorStep]:
    """Validate ``[pipeline]`` and instantiate its steps in order (before anything connects)."""
    data = dict(pipeline or {})
    step_tables = {k: data.pop(k) for k in list(data) if k != "steps"}
    config = validate_model(PipelineConfig, data, origin, prefix="pipeline")
    classes = [(name, load_step_class(name)) for name in config.steps]
    known = set(config.steps) | {getattr(cls, "name", n) for n, cls in classes}
    unknown = sorted(set(step_tables) - known)
    if unknown:
        raise ConfigError(
            f"{origin}: [pipeline.{unknown[0]}] configures a step that is not in pipeline.steps "
            f"({', '.join(config.steps)}); add it there or remove the table"
        )
    chain = []
    for name, cls in classes:
        table = step_tables.get(name) or step_tables.get(getattr(cls, "name", name)) or {}
        cfg = validate_model(cls.Config, table, origin, f"pipeline.{name}")
        chain.append(cls(cfg))
    return chain
