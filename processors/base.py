"""Processor step plumbing, kept for compatibility: it lives in :mod:`auditpipe.steps`.

A step is a verb: a class with a pydantic ``Config`` whose instances are callables
``event -> event | None``; it is registered under the entry point group
``auditpipe.processors``. The producer and the sinks build steps through
:mod:`auditpipe.steps` too, so every part shares one registry.
"""

from __future__ import annotations

from auditpipe.steps import (
    DEFAULT_CHAIN,
    ENTRY_POINT_GROUP,
    PipelineConfig,
    ProcessorStep,
    Step,
    available_steps,
    build_chain,
    build_step,
    load_step_class,
)

__all__ = [
    "DEFAULT_CHAIN",
    "ENTRY_POINT_GROUP",
    "PipelineConfig",
    "ProcessorStep",
    "Step",
    "available_steps",
    "build_chain",
    "build_step",
    "load_step_class",
]
