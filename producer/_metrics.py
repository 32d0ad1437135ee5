"""Prometheus metrics of an AuditProducer, read from its counters at scrape time.

Nothing is updated on the request path: a custom collector turns ``producer.stats()`` into
metric families when Prometheus scrapes. ``prometheus_client`` is imported only when these
functions are called.

Metrics (prefix ``auditpipe_producer_``): ``emitted_total``, ``sent_total``, ``failed_total``,
``spooled_total``, ``replayed_total``, ``dropped_total{reason}``, ``skipped_total{reason}``,
``spool_corrupt_records_total``, gauges ``queue_depth``, ``in_flight``, ``spool_bytes``,
``kafka_connected``, and the histogram ``send_latency_seconds`` (emit to Kafka acknowledgement).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ._producer import LATENCY_BUCKETS, AuditProducer


class ProducerCollector:
    """A ``prometheus_client`` collector for one producer."""

    def __init__(self, producer: AuditProducer, prefix: str = "auditpipe_producer") -> None:
        self.producer = producer
        self.prefix = prefix

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families are produced at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.producer.stats()
        p = self.prefix
        for name, doc in (
            ("emitted", "events accepted by emit()"),
            ("sent", "events acknowledged by Kafka (or written to stdout), replays included"),
            ("failed", "Kafka deliveries that failed (then spooled or dropped)"),
            ("spooled", "events appended to the disk spool"),
            ("replayed", "spooled events delivered to Kafka"),
            ("spool_corrupt_records", "corrupt spool records skipped"),
        ):
            yield CounterMetricFamily(f"{p}_{name}", doc, value=s[name])
        for name, doc in (
            ("dropped", "events dropped, by reason"),
            ("skipped", "captures not recorded (not stored), by reason"),
        ):
            fam = CounterMetricFamily(f"{p}_{name}", doc, labels=["reason"])
            for reason, count in sorted(s[name].items()):
                fam.add_metric([reason], count)
            yield fam
        for name, key, doc in (
            ("queue_depth", "queued", "events waiting for the sender"),
            ("in_flight", "in_flight", "events sent, not yet acknowledged"),
            ("spool_bytes", "spool_bytes", "bytes in the disk spool"),
            ("kafka_connected", "kafka_connected", "1 while a Kafka connection is up"),
        ):
            yield GaugeMetricFamily(f"{p}_{name}", doc, value=float(s[key]))
        cumulative, buckets = 0, []
        for bound, count in zip(
            (*(str(b) for b in LATENCY_BUCKETS), "+Inf"), s["send_latency_buckets"], strict=True
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            f"{p}_send_latency_seconds",
            "time from send to Kafka acknowledgement",
            buckets=buckets,
            sum_value=s["send_latency_sum"],
        )


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

    registry = registry if registry is not None else CollectorRegistry()
    register_metrics(producer, registry)
    return make_asgi_app(registry)
