"""The exception hierarchy every part of auditpipe shares.

    AuditpipeError
    ├── ConfigError          bad settings: names the key and says what is allowed
    ├── BrokerError          the embedded broker could not be started or reached
    └── auditpipe.schemas.DecodeError      bytes that are not an AuditEvent (says why)
        auditpipe.schemas.EventValidationError  a dict that is not a valid AuditEvent

Sinks raise ``auditpipe.sinks.RetriableSinkError`` / ``PermanentSinkError`` (see there).
"""

from __future__ import annotations


class AuditpipeError(Exception):
    """Base class of every error auditpipe raises on purpose."""


class ConfigError(AuditpipeError):
    """Invalid configuration. The message names the offending key and the fix."""


class BrokerError(AuditpipeError):
    """The Kafka broker could not be started, reached or prepared."""
