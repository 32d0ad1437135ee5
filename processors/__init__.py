"""Processor steps (pure functions of an event) and the Faust app that runs them."""

from auditpipe.steps import DEFAULT_CHAIN, available_steps, build_chain

from .pipeline import Outcome, chain_for, process_record
from .steps import ProcessorStep, Step, record_step, validate_step

__all__ = [
    "DEFAULT_CHAIN",
    "Outcome",
    "ProcessorStep",
    "Step",
    "available_steps",
    "build_chain",
    "chain_for",
    "process_record",
    "record_step",
    "validate_step",
]
