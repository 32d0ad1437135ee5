"""One metrics vocabulary for every stage, exposed through prometheus-client.

Every component (the producer hook, ``proxy``, ``receive``, ``ingest``, the processor worker,
each sink runner) describes itself as a :class:`Stage` snapshot read from its own counters at
scrape time (nothing is updated on a request path, nothing is counted twice). This module turns
snapshots into the metric families below; no component writes exposition text itself.

============================================  =========  ==========================================
name                                          type       labels / meaning
============================================  =========  ==========================================
``auditpipe_events_received_total``           counter    stage: events (records) a stage took in
``auditpipe_events_sent_total``               counter    stage: passed on (sinks: written durably)
``auditpipe_events_dropped_total``            counter    stage, reason: dropped on purpose or lost
``auditpipe_events_dead_lettered_total``      counter    stage, reason: sent to the DLQ topic
``auditpipe_events_skipped_total``            counter    stage, reason: not captured (not stored...)
``auditpipe_retries_total``                   counter    stage: failed attempts that are retried
``auditpipe_errors_total``                    counter    stage, type: errors by type
``auditpipe_spooled_total``                   counter    stage: events written to the disk spool
``auditpipe_replayed_total``                  counter    stage: spooled events delivered later
``auditpipe_events_by_dimension_total``       counter    stage, dimension, value: per model/tenant
``auditpipe_stage_events_total``              counter    stage, kind: what one stage alone counts
``auditpipe_lag``                             gauge      stage, partition: records not committed
``auditpipe_queue_depth``                     gauge      stage: events waiting in memory
``auditpipe_in_flight``                       gauge      stage: sent, not yet acknowledged
``auditpipe_spool_bytes``                     gauge      stage: bytes in the disk spool
``auditpipe_kafka_connected``                 gauge      stage: 1 while Kafka is reachable
``auditpipe_pending``                         gauge      stage: halves waiting for their pair
``auditpipe_paused_partitions``               gauge      stage: partitions paused by failures
``auditpipe_latency_seconds``                 histogram  stage, op: send (to the Kafka ack), write
                                                         (a sink batch), process (a worker batch)
============================================  =========  ==========================================

``stage`` is ``producer``, ``proxy``, ``receiver``, ``ingest``, ``processor`` or
``sink.NAME``. Serving: :func:`serve_async` (an asyncio server, ``/metrics`` and ``/healthz``)
or :func:`serve_thread` (a thread, for commands whose loop belongs to uvicorn); the port is
``[metrics] port`` (see docs/operations.md). ``prometheus_client`` is imported only when a
registry is built, so the producer hook stays light to import.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

PREFIX = "auditpipe_"

#: name -> (type, labels after ``stage``, help). The Grafana dashboard may use only these.
VOCABULARY: dict[str, tuple[str, tuple[str, ...], str]] = {
    "auditpipe_events_received": ("counter", (), "events a stage took in"),
    "auditpipe_events_sent": ("counter", (), "events a stage passed on (sinks: written)"),
    "auditpipe_events_dropped": ("counter", ("reason",), "events dropped, by reason"),
    "auditpipe_events_dead_lettered": ("counter", ("reason",), "events sent to the DLQ"),
    "auditpipe_events_skipped": ("counter", ("reason",), "exchanges not captured, by reason"),
    "auditpipe_retries": ("counter", (), "failed attempts that will be retried"),
    "auditpipe_errors": ("counter", ("type",), "errors by type"),
    "auditpipe_spooled": ("counter", (), "events appended to the disk spool"),
    "auditpipe_replayed": ("counter", (), "spooled events delivered"),
    "auditpipe_events_by_dimension": (
        "counter",
        ("dimension", "value"),
        "forwarded events per model and per tenant (each worker: its partitions' keys)",
    ),
    "auditpipe_stage_events": (
        "counter",
        ("kind",),
        "what only one stage counts, by kind (receiver: paired, request_only, evicted...; "
        "proxy: client_disconnects; ingest: lines, other...)",
    ),
    "auditpipe_lag": ("gauge", ("partition",), "records not yet committed, by partition"),
    "auditpipe_queue_depth": ("gauge", (), "events waiting in memory"),
    "auditpipe_in_flight": ("gauge", (), "events sent, not yet acknowledged"),
    "auditpipe_spool_bytes": ("gauge", (), "bytes in the disk spool"),
    "auditpipe_kafka_connected": ("gauge", (), "1 while a Kafka connection is up"),
    "auditpipe_pending": ("gauge", (), "halves (request or response) waiting for the other"),
    "auditpipe_paused_partitions": ("gauge", (), "partitions paused by failures"),
    "auditpipe_latency_seconds": ("histogram", ("op",), "latency of an operation"),
}
_COUNTER_FIELDS = {
    "received": "auditpipe_events_received",
    "sent": "auditpipe_events_sent",
    "retries": "auditpipe_retries",
    "spooled": "auditpipe_spooled",
    "replayed": "auditpipe_replayed",
}
_LABELLED_FIELDS = {
    "dropped": "auditpipe_events_dropped",
    "dead_lettered": "auditpipe_events_dead_lettered",
    "skipped": "auditpipe_events_skipped",
    "errors": "auditpipe_errors",
    "counts": "auditpipe_stage_events",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def metric_names() -> set[str]:
    """Every series name the vocabulary produces (``_total``, ``_bucket``... included)."""
    out: set[str] = set()
    for name, (kind, _, _) in VOCABULARY.items():
        if kind == "counter":
            out |= {f"{name}_total", f"{name}_created"}
        elif kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        else:
            out.add(name)
    return out


class Latency:
    """A histogram a component observes into (thread-safe, no prometheus import)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self.sum += seconds

    def snapshot(self) -> tuple[tuple[float, ...], list[int], float]:
        with self._lock:
            return self.bounds, list(self.counts), self.sum


@dataclass
class Stage:
    """What one stage reports at one scrape (fields left empty are not exported)."""

    stage: str
    received: int | None = None
    sent: int | None = None
    retries: int | None = None
    spooled: int | None = None
    replayed: int | None = None
    dropped: Mapping[str, int] = field(default_factory=dict)
    dead_lettered: Mapping[str, int] = field(default_factory=dict)
    skipped: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)  # auditpipe_stage_events{kind}
    lag: Mapping[str, int] = field(default_factory=dict)
    gauges: Mapping[str, float] = field(default_factory=dict)  # vocabulary gauge names
    by_dimension: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: op -> (bucket upper bounds, counts per bucket plus one above them, sum)
    latency: Mapping[str, tuple[Sequence[float], Sequence[int], float]] = field(
        default_factory=dict
    )


Source = Callable[[], Iterable[Stage]]


class StageCollector:
    """A prometheus-client collector over stage sources, read at scrape time."""

    def __init__(self, sources: Iterable[Source] = ()) -> None:
        self.sources = list(sources)

    def add(self, source: Source) -> None:
        self.sources.append(source)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stages = [s for source in self.sources for s in source()]
        families: dict[str, Any] = {}
        for name, (kind, labels, doc) in VOCABULARY.items():
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}.get(kind)
            family = (cls or HistogramMetricFamily)(name, doc, labels=["stage", *labels])
            families[name] = family
        for s in stages:
            for attr, name in _COUNTER_FIELDS.items():
                value = getattr(s, attr)
                if value is not None:
                    families[name].add_metric([s.stage], value)
            for attr, name in _LABELLED_FIELDS.items():
                for label, value in sorted(getattr(s, attr).items()):
                    families[name].add_metric([s.stage, label], value)
            for (dimension, value), n in sorted(s.by_dimension.items()):
                families["auditpipe_events_by_dimension"].add_metric([s.stage, dimension, value], n)
            for partition, lag in sorted(s.lag.items()):
                families["auditpipe_lag"].add_metric([s.stage, partition], lag)
            for name, value in sorted(s.gauges.items()):
                if VOCABULARY.get(name, ("",))[0] != "gauge":
                    raise ValueError(f"{name} is not a gauge of auditpipe.metrics.VOCABULARY")
                families[name].add_metric([s.stage], value)
            for op, (bounds, counts, total) in sorted(s.latency.items()):
                cumulative, buckets = 0, []
                for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                families["auditpipe_latency_seconds"].add_metric([s.stage, op], buckets, total)
        yield from families.values()


def make_registry(*sources: Source) -> tuple[Any, StageCollector]:
    """A registry of its own holding one :class:`StageCollector` over ``sources``."""
    from prometheus_client import CollectorRegistry

    collector = StageCollector(sources)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry, collector


def exposition(registry: Any) -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return bytes(generate_latest(registry)), CONTENT_TYPE_LATEST


Health = Callable[[], tuple[bool, Mapping[str, Any]]]


async def serve_async(
    registry: Any, host: str, port: int, health: Health | None = None
) -> asyncio.Server:
    """``GET /metrics`` and ``GET /healthz`` on an asyncio server (``port`` 0: any free one).

    ``/healthz``: 200 with ``health()``'s JSON while it says healthy, else 503 (200 ``ok``
    without a ``health``). The caller closes the server.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else "/"
            if path.startswith("/metrics"):
                body, ctype = exposition(registry)
                status = "200 OK"
            elif path.startswith("/healthz"):
                ok, detail = health() if health is not None else (True, {"status": "ok"})
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", orjson.dumps(detail, default=str)
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


class ThreadServer:
    """``/metrics`` and ``/healthz`` served from a daemon thread (prometheus-client's WSGI app).

    For commands whose event loop belongs to someone else (uvicorn) or that have none.
    """

    def __init__(self, registry: Any, host: str, port: int) -> None:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("PATH_INFO", "").startswith("/healthz"):
                start_response("200 OK", [("Content-Type", "application/json")])
                return [b'{"status": "ok"}']
            return metrics(environ, start_response)

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per scrape is noise

        self._server = make_server(host, port, app, Server, handler_class=Quiet)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="auditpipe-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving (safe twice)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()


def serve_thread(registry: Any, host: str, port: int | None) -> ThreadServer | None:
    """Serve ``registry`` when ``port`` is set (``[metrics] port``); None when it is not."""
    if port is None:
        return None
    server = ThreadServer(registry, host, port)
    import logging

    logging.getLogger("auditpipe.metrics").info(
        "serving /metrics on http://%s:%d/metrics", host, server.port
    )
    return server


# -- the stage of each component (read from its own counters) ----------------------------------


def producer_stage(producer: Any, stage: str = "producer") -> Source:
    """An ``AuditProducer`` (``producer.stats()``) as a stage."""

    def read() -> list[Stage]:
        s = producer.stats()
        errors = {"send_failed": s["failed"]}
        if s.get("spool_corrupt_records"):
            errors["spool_corrupt"] = s["spool_corrupt_records"]
        return [
            Stage(
                stage,
                received=s["emitted"],
                sent=s["sent"],
                spooled=s["spooled"],
                replayed=s["replayed"],
                dropped=s["dropped"],
                skipped=s["skipped"],
                errors=errors,
                gauges={
                    "auditpipe_queue_depth": float(s["queued"]),
                    "auditpipe_in_flight": float(s["in_flight"]),
                    "auditpipe_spool_bytes": float(s["spool_bytes"]),
                    "auditpipe_kafka_connected": float(s["kafka_connected"]),
                },
                latency={
                    "send": (
                        _producer_buckets(),
                        s["send_latency_buckets"],
                        s["send_latency_sum"],
                    )
                },
            )
        ]

    return read


def _producer_buckets() -> tuple[float, ...]:
    from auditpipe.producer._producer import LATENCY_BUCKETS as bounds

    return tuple(bounds)


RECEIVER_EMITTED = ("paired", "request_only", "response_only")
RECEIVER_DROPPED = ("too_large", "rejected", "ignored_types", "duplicates")


def receiver_stage(receiver: Any) -> Source:
    """A ``KServeReceiver`` as the stage ``receiver`` (its producer is a stage of its own)."""

    def read() -> list[Stage]:
        st = dict(receiver.stats)
        snap = receiver.snapshot()
        return [
            Stage(
                "receiver",
                received=st.get("requests", 0) + st.get("responses", 0),
                sent=sum(st.get(k, 0) for k in RECEIVER_EMITTED),
                dropped={k: st[k] for k in RECEIVER_DROPPED if k in st},
                counts={k: v for k, v in st.items() if k not in RECEIVER_DROPPED},
                gauges={"auditpipe_pending": float(snap["pending"])},
            )
        ]

    return read


def proxy_stage(proxy: Any) -> Source:
    """A ``ProxyApp``'s upstream failures (errors by kind) and client disconnects, stage
    ``proxy``; its requests, their status and latency come from :class:`RequestMetrics`."""

    def read() -> list[Stage]:
        st = dict(proxy.stats)
        st.pop("requests", None)
        disconnects = st.pop("client_disconnects", 0)
        return [Stage("proxy", errors=st, counts={"client_disconnects": disconnects})]

    return read


def ingest_stage(ingest: Any) -> Source:
    """An ``Ingest`` run as the stage ``ingest`` (lines in, audit records published)."""

    def read() -> list[Stage]:
        r = ingest.report
        skipped = sum(r.malformed.values()) - r.malformed_dead_lettered
        dead = {"malformed": r.malformed_dead_lettered} if r.malformed_dead_lettered else {}
        if r.dead_lettered > r.malformed_dead_lettered:
            dead["other"] = r.dead_lettered - r.malformed_dead_lettered
        return [
            Stage(
                "ingest",
                received=r.lines,
                sent=r.records,
                dropped={"malformed": skipped} if skipped else {},
                dead_lettered=dead,
                errors={f"malformed_{k}": v for k, v in r.malformed.items()},
                counts={**{f"other_{k}": v for k, v in r.other.items()}, **r.files},
            )
        ]

    return read


class RequestMetrics:
    """An ASGI wrapper that counts HTTP requests by status class and times them.

    ``source()`` is its stage: ``received`` (requests), ``errors{type="http_5xx"}``,
    ``auditpipe_stage_events_total{kind="http_2xx"...}`` and
    ``auditpipe_latency_seconds{op="request"}`` (until the response started). Used by
    ``auditpipe serve`` and ``auditpipe proxy`` (there: the upstream's time to first byte plus
    the proxy's own).
    """

    def __init__(self, app: Any, stage: str) -> None:
        self.app = app
        self.stage = stage
        self.requests = 0
        self.by_class: dict[str, int] = {}
        self.latency = Latency()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # an exception before the response started

        async def send_status(message: Any) -> None:
            nonlocal status
            if message.get("type") == "http.response.start":
                status = int(message["status"])
                self.latency.observe(time.monotonic() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.requests += 1
            key = f"http_{status // 100}xx"
            self.by_class[key] = self.by_class.get(key, 0) + 1

    def source(self) -> Source:
        def read() -> list[Stage]:
            by_class = dict(self.by_class)
            errors = {"http_5xx": by_class.pop("http_5xx")} if "http_5xx" in by_class else {}
            return [
                Stage(
                    self.stage,
                    received=self.requests,
                    errors=errors,
                    counts=by_class,
                    latency={"request": self.latency.snapshot()},
                )
            ]

        return read
