"""The hook attached to inference servers. Importing it stays light: no faust, boto3, pymongo
or psycopg (a test checks); prometheus_client, opentelemetry and openai are imported only when
used.

- :class:`AuditProducer`: non-blocking ``emit()`` to Kafka (or stdout), disk spool, counters.
- :class:`AuditMiddleware`: ASGI middleware for OpenAI-compatible and OIP v2 endpoints.
- :func:`capture` / :func:`record`: capture without ASGI; :func:`wrap_openai`: the openai client.
- :func:`metrics_app` / :func:`register_metrics`: Prometheus metrics of a producer.
"""

from ._capture import Capture, capture, record
from ._event import NEVER_RECORDED, parse_traceparent
from ._metrics import ProducerCollector, metrics_app, register_metrics
from ._middleware import AuditMiddleware
from ._openai import wrap_openai
from ._producer import AuditProducer
from ._spool import Spool, SpoolError

__all__ = [
    "NEVER_RECORDED",
    "AuditMiddleware",
    "AuditProducer",
    "Capture",
    "ProducerCollector",
    "Spool",
    "SpoolError",
    "capture",
    "metrics_app",
    "parse_traceparent",
    "record",
    "register_metrics",
    "wrap_openai",
]
