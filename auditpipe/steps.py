"""Steps: the verbs every part of auditpipe can run on an event, their registry and chains.

A step is a class with a pydantic ``Config`` (unknown keys rejected) whose instances are
callables ``event -> event | None`` (``None`` drops the event). Steps are pure: no I/O, no
clocks other than timestamps they record, no shared mutable state. Raising means the step
failed on this event: whoever runs it dead-letters the event (it is never passed on as is).
Steps are registered under the entry point group ``auditpipe.processors``.

The processors run the chain of ``[pipeline]``; a sink may run a chain of its own before it
writes (``[sinks.NAME] steps = [...]``, see ``auditpipe.sinks.base``); the producer may run
the redact step in its sender (``[producer] redact = true``). All of them build steps here, so
``producer`` and ``sinks`` never import ``auditpipe.processors``.

Settings (``[pipeline]``; a sink's table has the same layout under ``[sinks.NAME]``)::

    [pipeline]
    steps = ["enrich", "redact", "sample"]   # the default chain, in order
    [pipeline.redact]                        # each step's own table (optional)
    ...
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import Field

from auditpipe.errors import ConfigError
from auditpipe.models import StrictModel, validate_model
from auditpipe.plugins import available, bind_config_model, load_entry_point
from auditpipe.schemas import Event

ENTRY_POINT_GROUP = "auditpipe.processors"
DEFAULT_CHAIN = ("enrich", "redact", "sample")

#: What a chain holds: any callable ``event -> event | None`` (a :class:`ProcessorStep`, or a
#: plain function such as ``auditpipe.processors.validate_step``). The one definition: the
#: processors, the sinks and the producer import it from here.
Step = Callable[[Event], Event | None]


ConfigT = TypeVar("ConfigT", bound=StrictModel)


class ProcessorStep(Generic[ConfigT]):
    """Base class of configurable steps, generic over their config model.

    A subclass names its model once, ``class MyStep(ProcessorStep[MyConfig])``, and sets
    ``name`` (and ``version`` when its behaviour changes); ``Config`` follows from the generic
    argument and ``self.config`` is typed as ``MyConfig``. A step without settings subclasses
    ``ProcessorStep[StrictModel]``.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StrictModel]] = StrictModel

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bind_config_model(cls, ProcessorStep)

    def __init__(self, config: ConfigT | None = None) -> None:
        self.config: ConfigT = config if config is not None else cast(ConfigT, self.Config())

    @property
    def __name__(self) -> str:  # used in dead-letter headers ("step:<name>")
        return self.name

    def __call__(self, event: Event) -> Event | None:  # pragma: no cover - abstract
        raise NotImplementedError


def record_step(
    event: Event,
    step: str,
    version: str,
    action: str,
    counts: Mapping[str, int] | None = None,
    policy_version: str | None = None,
) -> Event:
    """Append one entry to ``event["processing"]`` (a new list; the input is not mutated).

    ``policy_version`` names the configuration that produced the result (the redact step's
    policy hash), so an auditor can tell which rules a record went through.
    """
    entry: dict[str, Any] = {
        "step": step,
        "version": version,
        "action": action,
        "ts_ms": time.time_ns() // 1_000_000,
        "counts": dict(counts or {}),
        "policy_version": policy_version,  # always there, as decoding fills it in
    }
    return {**event, "processing": [*event.get("processing", []), entry]}


class PipelineConfig(StrictModel):
    steps: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CHAIN),
        description="step names (entry points of auditpipe.processors, or module:Class), in order",
    )


def available_steps() -> dict[str, str]:
    return available(ENTRY_POINT_GROUP)


def load_step_class(name: str, key: str = "pipeline.steps") -> type[ProcessorStep]:
    """A step by entry point name, or by import path ``package.module:Class``. ``key`` names
    the setting the name came from in errors."""
    if ":" not in name:
        install = "install the extra that provides it (pip install 'auditpipe[processors]')"
        return load_entry_point(ENTRY_POINT_GROUP, name, ProcessorStep, "step", install, key)
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}: cannot import {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, ProcessorStep)):
        raise ConfigError(f"{key}: {name!r} is not an auditpipe.processors step class")
    return cls


def build_step(
    name: str, table: Mapping[str, Any] | None, origin: str = "settings", prefix: str = "pipeline"
) -> ProcessorStep:
    """One step ``name`` configured from ``table`` (errors name ``<prefix>.<name>.<key>``)."""
    cls = load_step_class(name, f"{prefix}.steps")
    cfg = validate_model(cls.Config, dict(table or {}), origin, f"{prefix}.{name}")
    return cls(cfg)


def build_chain(
    pipeline: Mapping[str, Any] | None,
    origin: str = "settings",
    prefix: str = "pipeline",
    default: tuple[str, ...] = DEFAULT_CHAIN,
    instantiate: bool = True,
) -> list[ProcessorStep]:
    """Validate a chain table (``steps`` plus one table per step) and instantiate its steps in
    order, before anything connects. ``prefix`` is where the table lives in the settings
    (``pipeline``, ``sinks.postgres``): errors name the key there. ``default``: the steps when
    the table has no ``steps``. ``instantiate=False`` validates only (no step is built, so a
    secret a step reads at construction need not be present), and returns []."""
    data = dict(pipeline or {})
    step_tables = {k: data.pop(k) for k in list(data) if k != "steps"}
    if "steps" not in data:
        data["steps"] = list(default)
    config = validate_model(PipelineConfig, data, origin, prefix=prefix)
    classes = [(name, load_step_class(name, f"{prefix}.steps")) for name in config.steps]
    known = set(config.steps) | {getattr(cls, "name", n) for n, cls in classes}
    unknown = sorted(set(step_tables) - known)
    if unknown:
        raise ConfigError(
            f"{origin}: [{prefix}.{unknown[0]}] configures a step that is not in {prefix}.steps "
            f"({', '.join(config.steps) or 'empty'}); add it there or remove the table"
        )
    configured = []
    for name, cls in classes:
        table = step_tables.get(name) or step_tables.get(getattr(cls, "name", name)) or {}
        if not isinstance(table, Mapping):
            raise ConfigError(f"{origin}: [{prefix}.{name}] must be a table")
        cfg = validate_model(cls.Config, dict(table), origin, f"{prefix}.{name}")
        configured.append((cls, cfg))
    if not instantiate:
        return []
    return [cls(cfg) for cls, cfg in configured]
