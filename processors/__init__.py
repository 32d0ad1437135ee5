"""Processor steps (pure functions of an event) and the Faust app that runs them."""

from .pipeline import Outcome, process_record
from .steps import DEFAULT_STEPS, Step, record_step, validate_step

__all__ = ["DEFAULT_STEPS", "Outcome", "Step", "process_record", "record_step", "validate_step"]
