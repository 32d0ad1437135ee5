"""auditpipe: capture what inference servers see and say, and carry it to audit stores.

The shared core lives here (settings, Kafka client settings, CLI, the embedded broker); the
parts are the subpackages ``auditpipe.producer``, ``auditpipe.processors``,
``auditpipe.sinks`` and ``auditpipe.schemas``.
"""

from .errors import AuditpipeError, BrokerError, ConfigError

__version__ = "0.1.0"
__all__ = ["AuditpipeError", "BrokerError", "ConfigError", "__version__"]
