"""The hook attached to inference servers. Importing it stays light: no faust, boto3, pymongo
or psycopg (a test checks)."""

from ._middleware import AuditMiddleware
from ._producer import AuditProducer

__all__ = ["AuditMiddleware", "AuditProducer"]
