"""Prometheus metrics of an AuditProducer, in auditpipe's one vocabulary (auditpipe.metrics).

Nothing is updated on the request path: the producer's counters (``producer.stats()``) are
read when Prometheus scrapes and exported with ``stage="producer"``:
``auditpipe_events_received_total`` (emitted), ``auditpipe_events_sent_total``,
``auditpipe_events_dropped_total{reason}``, ``auditpipe_events_skipped_total{reason}``,
``auditpipe_errors_total{type="send_failed"|"spool_corrupt"}``, ``auditpipe_spooled_total``,
``auditpipe_replayed_total``, gauges ``auditpipe_queue_depth``, ``auditpipe_in_flight``,
``auditpipe_spool_bytes``, ``auditpipe_kafka_connected`` and the histogram
``auditpipe_latency_seconds{op="send"}`` (emit to Kafka acknowledgement).
``prometheus_client`` is imported only when these functions are called.
"""

from __future__ import annotations

from typing import Any

from auditpipe.metrics import StageCollector, producer_stage

from ._producer import AuditProducer


class ProducerCollector(StageCollector):
    """A ``prometheus_client`` collector for one producer."""

    def __init__(self, producer: AuditProducer, stage: str = "producer") -> None:
        super().__init__([producer_stage(producer, stage)])
        self.producer = producer


def register_metrics(producer: AuditProducer, registry: Any = None) -> Any:
    """Register the producer's collector (default: the global registry). Returns the registry."""
    from prometheus_client import REGISTRY

    registry = registry if registry is not None else REGISTRY
    registry.register(ProducerCollector(producer))
    return registry


def metrics_app(producer: AuditProducer, registry: Any = None) -> Any:
    """An ASGI app serving the producer's metrics, to mount at ``/metrics``.

    Uses a registry of its own unless ``registry`` is given.
    """
    from prometheus_client import CollectorRegistry, make_asgi_app

    registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
    register_metrics(producer, registry)
    return make_asgi_app(registry)
