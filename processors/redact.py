"""The redact step, kept importable here for compatibility: it lives in
:mod:`auditpipe.redaction.step` (shared with the producer and the sinks)."""

from auditpipe.redaction.step import CustomDetector, FieldRule, RedactConfig, RedactStep

__all__ = ["CustomDetector", "FieldRule", "RedactConfig", "RedactStep"]
