"""The Faust app that runs the processor steps between ``auditpipe.raw`` and ``auditpipe.events``.

``create_app(settings)`` builds a fresh app (no module-level app: tests build many). The agent
takes records in batches with acking left to it (``noack_take``), runs the steps, and hands the
outcomes to a delivery task; it acks a batch's records only once every outcome was acknowledged
by Kafka (forwarded or dead-lettered), and Faust commits only acked offsets. A failed send is
retried with backoff (``auditpipe.retry``), so no record is committed before it went somewhere;
a record Kafka rejects for good (too large) is dead-lettered instead of stalling the worker.
While batch k is in flight the agent processes batch k+1 (at most two batches in memory).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, cast

import faust
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from auditpipe.dlq import H_REASON, dead_letter_headers
from auditpipe.kafka import faust_broker_options
from auditpipe.metrics import Latency, Source, Stage, exposition, make_registry, serve_async
from auditpipe.retry import Backoff, is_permanent
from auditpipe.settings import Settings

from .pipeline import Outcome, chain_for, process_record
from .steps import Step

Record = tuple[bytes | None, bytes | None, str, int, int]  # key, value, topic, partition, offset

log = logging.getLogger("auditpipe.processors")

BATCH_MAX_EVENTS = 500
BATCH_WITHIN_SECS = 0.05
DELIVERY_ON_STOP_SECS = 10.0


def install_commit_guard() -> None:
    """Never commit past a record that was not acknowledged (faust-streaming 0.15.3).

    Faust commits the first run of consecutive acknowledged offsets, and refuses when the
    lowest acknowledged offset is more than one above the committed one, but not when it is
    exactly one above: with offset C committed (C is the next record to read), C unacknowledged
    and C+1 acknowledged, it commits C+2, and record C is never processed. That happens when a
    rebalance interrupts Faust's hand-over of record C to the stream while later records of the
    same fetch still go through. ``auditpipe soak`` saw one event lost 4 s after a processor
    restart; this is the one path found by which the processor commits what it did not
    deliver. Offsets Faust itself knows to be gaps (transaction markers, compaction) still count
    as done. The commit waits instead (the partition's next rebalance reads from C again).
    """
    from faust.transport.consumer import Consumer

    original = Consumer._new_offset
    if getattr(original, "_auditpipe_guard", False):
        return

    def _new_offset(self: Any, tp: Any) -> int | None:
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None:
            lowest = min(acked)
            if lowest > committed and not _is_gap(self._gap.get(tp), committed, lowest):
                _warn_held(tp, committed, lowest)
                return None
        return original(self, tp)

    _new_offset._auditpipe_guard = True  # type: ignore[attr-defined]
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]


def _is_gap(gaps: Any, start: int, end: int) -> bool:
    """Whether Faust's gap tree covers offsets ``start`` .. ``end - 1``."""
    if not gaps:
        return False
    return any(iv.begin <= start and iv.end >= end for iv in gaps.at(start))


_HELD_WARNED: dict[Any, float] = {}


def _warn_held(tp: Any, committed: int, lowest: int) -> None:
    import time

    now = time.monotonic()
    if now - _HELD_WARNED.get(tp, -1e9) >= 60:
        _HELD_WARNED[tp] = now
        log.warning(
            "%s: record %d is not acknowledged but %d is; the commit waits at %d (it is read "
            "again after the next rebalance)", tp, committed, lowest, committed,
        )  # fmt: skip


def create_app(settings: Settings, **overrides: Any) -> faust.App:
    install_commit_guard()
    steps = chain_for(settings.pipeline)  # validate the chain before anything connects
    kafka = settings.kafka
    proc = settings.processors
    options: dict[str, Any] = {
        **faust_broker_options(kafka),  # broker URLs and [kafka] TLS/SASL credentials
        # JSON by default (the counts topic and table); the pipeline's topics are raw bytes
        "value_serializer": "json",
        "key_serializer": "json",
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "producer_acks": -1,
        "producer_compression_type": (
            None if settings.producer.compression == "none" else settings.producer.compression
        ),
        "producer_linger": 0.005,
        "producer_max_batch_size": 1 << 20,
        "broker_session_timeout": proc.session_timeout_secs,
        "broker_heartbeat_interval": proc.heartbeat_interval_secs,
        "web_enabled": proc.web_port is not None,
        "web_port": proc.web_port or 6066,
        "datadir": proc.data_dir or tempfile.mkdtemp(prefix="auditpipe-faust-"),
        "consumer_auto_offset_reset": "earliest",
        "table_standby_replicas": 0,  # standbys would make workers double-report counts
    }
    options.update(overrides)
    app = faust.App(proc.app_id, **options)

    raw = app.topic(
        kafka.raw_topic,
        value_type=bytes,
        key_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    stats = WorkerStats()
    # Per-model and per-tenant event counts: a Faust table fed by a small keyed topic, so each
    # key is counted on the worker that owns its partition and survives restarts (changelog).
    counts_topic = app.topic(
        f"{proc.app_id}-counts",
        key_type=str,
        partitions=kafka.partitions,
        internal=True,  # created by the worker with exactly these partitions (like the table's)
    )
    counts = app.Table(
        "counts",
        default=int,
        key_type=str,
        value_type=int,
        partitions=kafka.partitions,
    )

    @app.agent(counts_topic, name="auditpipe.count")
    async def count(stream: faust.StreamT[int]) -> None:
        async for key, n in stream.items():
            counts[key] += n

    def lag() -> dict[str, int]:
        # records of the raw topic not yet committed, per assigned partition (what Prometheus
        # alerts on when the processors fall behind); Faust keeps no public committed map
        out = {}
        try:
            consumer = app.consumer
            committed = getattr(consumer, "_committed_offset", {})
            for tp in consumer.assignment():
                if tp.topic == kafka.raw_topic:
                    high = consumer.highwater(tp)
                    if high is not None:
                        out[f"{tp.topic}[{tp.partition}]"] = max(0, high - (committed.get(tp) or 0))
        except Exception:  # not started, rebalancing: no figure this scrape
            return {}
        return out

    registry, _ = make_registry(processor_stage(stats, lambda: dict(counts.items()), lag))

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        body, ctype = exposition(registry)
        # aiohttp takes the charset separately
        return web.bytes(body, content_type=ctype.replace("; charset=utf-8", ""))

    if settings.metrics.port is not None:
        # [metrics] port: the same registry without Faust's web server (processors.web_port)
        @app.task
        async def serve_metrics() -> None:
            m = settings.metrics
            server = await serve_async(registry, m.host, m.port or 0)
            host, port = server.sockets[0].getsockname()[:2]
            log.info("serving /metrics on http://%s:%d/metrics", host, port)

    # declared so that Faust knows (and can create) them; records go out via app.producer
    for name in (kafka.events_topic, kafka.dlq_topic):
        app.topic(
            name, value_type=bytes, key_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    async def deliver(outcomes: list[Outcome], batch: list[Any]) -> list[Outcome]:
        """Send every outcome (``batch[i]`` is outcome i's source event) until Kafka acknowledged
        it, and return the outcomes as delivered. A transient failure is retried with backoff; a
        record Kafka rejects for good (too large, an invalid or unauthorized topic) cannot stall
        the worker: it becomes a dead letter (reason ``kafka_rejected``, original bytes), and a
        dead letter rejected for its size goes to the DLQ without its value."""
        final = list(outcomes)
        pending = [i for i, o in enumerate(final) if o.kind != "drop"]
        backoff = Backoff(0.1, 5.0)
        alone: set[int] = set()  # sent one record a request: isolating a permanent rejection
        while pending:
            sends, covered = await hand_over(final, pending, alone)
            results = await asyncio.gather(*sends, return_exceptions=True)
            retry, transient = [], 0
            for ids, result in zip(covered, results, strict=True):
                if not isinstance(result, Exception):
                    continue
                retry.extend(ids)
                if len(ids) > 1 and is_permanent(result):
                    alone.update(ids)  # which record? send them one by one to find out
                    continue
                i = ids[0]
                replacement = _rejected(final[i], batch[i].message, result)
                if replacement is None:
                    transient += 1
                else:
                    log.error(
                        "Kafka rejected a record for good (%s: %s); %s",
                        type(result).__name__, result, replacement.reason,
                    )  # fmt: skip
                    final[i] = replacement
            if transient:
                delay = backoff.next()
                log.warning(
                    "%d record(s) not acknowledged by Kafka; retrying in %.2fs", transient, delay
                )
                await asyncio.sleep(delay)
            pending = sorted(retry)
        return final

    async def hand_over(
        final: list[Outcome], pending: list[int], alone: set[int]
    ) -> tuple[list[asyncio.Future[Any]], list[list[int]]]:
        """Give the ``pending`` outcomes to aiokafka as record batches, one per topic partition
        (the partition aiokafka's own partitioner gives the key, as ``send`` would): one future
        per batch instead of one per record. Returns the futures and the outcome indices each
        covers; what cannot be handed over fails its future (retried or dead-lettered)."""
        producer = cast(Any, app.producer)._ensure_producer()  # the transport's aiokafka one
        limit = producer._max_request_size
        sends: list[asyncio.Future[Any]] = []
        covered: list[list[int]] = []
        groups: dict[tuple[str, int | None], list[int]] = {}
        ready: set[str] = set()  # topics whose metadata aiokafka has (send() waits for it too)
        for i in pending:
            o = final[i]
            topic = kafka.events_topic if o.kind == "forward" else kafka.dlq_topic
            part: int | None = None
            if i not in alone and estimate_size_in_bytes(o.key, o.value, o.headers) > limit:
                alone.add(i)  # send() refuses it for its size, as the broker would
            if i not in alone:
                try:
                    if topic not in ready:
                        await producer.partitions_for(topic)
                        ready.add(topic)
                    part = producer._partition(topic, None, o.key, o.value, o.key, o.value)
                except Exception as exc:
                    sends.append(_failed_future(exc))
                    covered.append([i])
                    continue
            groups.setdefault((topic, part), []).append(i)
        for (topic, part), ids in groups.items():
            if part is None:  # one request a record
                for i in ids:
                    o = final[i]
                    try:
                        sends.append(await producer.send(topic, o.value, key=o.key,
                                                         headers=o.headers or None))  # fmt: skip
                    except Exception as exc:  # refused before sending, e.g. over the limit
                        sends.append(_failed_future(exc))
                    covered.append([i])
                continue
            start = 0
            while start < len(ids):
                builder = producer.create_batch()
                end = start
                while end < len(ids):
                    o = final[ids[end]]
                    headers = o.headers or []
                    if builder.append(key=o.key, value=o.value, timestamp=None,
                                      headers=headers) is None:  # fmt: skip
                        break
                    end += 1
                if end == start:  # a record larger than a batch: aiokafka sizes (or refuses) it
                    alone.add(ids[start])
                    o = final[ids[start]]
                    try:
                        sends.append(await producer.send(topic, o.value, key=o.key,
                                                         headers=o.headers or None))  # fmt: skip
                    except Exception as exc:
                        sends.append(_failed_future(exc))
                    covered.append([ids[start]])
                    start += 1
                    continue
                try:
                    sends.append(await producer.send_batch(builder, topic, partition=part))
                except Exception as exc:
                    sends.append(_failed_future(exc))
                covered.append(ids[start:end])
                start = end
        return sends, covered

    async def deliver_and_ack(
        stream: faust.StreamT[bytes], batch: list[Any], outcomes: list[Outcome]
    ) -> None:
        # Every outcome acknowledged by Kafka first, then the source records: Faust commits
        # only acked offsets, so nothing is committed before it went somewhere.
        outcomes = await deliver(outcomes, batch)
        # The counts go out before the acks: Faust's commit flushes the producer first, so a
        # committed batch's counts are on their topic (a crash before the commit recounts).
        for dim_key, n in batch_counts(outcomes).items():
            await counts_topic.send(key=dim_key, value=n)
        for event in batch:
            await stream.ack(event)
        stats.observe(outcomes)

    @app.agent(raw, name="auditpipe.process")
    async def process(stream: faust.StreamT[bytes]) -> None:
        # Pipelined: while batch k is on its way to Kafka, later batches are processed (in this
        # process, or in the step processes). Deliveries run one batch at a time, in order.
        # noack_take leaves acking to us (take_events would ack when the loop body ends, that
        # is before delivery); deliver_and_ack acks a batch once Kafka acknowledged it.
        pool = StepPool(proc.step_processes, settings.pipeline) if proc.step_processes else None
        depth = proc.step_processes + 1  # batches in flight: every step process busy + 1
        inflight: deque[asyncio.Future[None]] = deque()

        async def finish(
            batch: list[Any],
            processing: asyncio.Future[list[Outcome]],
            previous: asyncio.Future[None] | None,
            started: float,
        ) -> None:
            try:
                outcomes = await processing
            except (KeyboardInterrupt, SystemExit) as exc:  # from a step process: not ours
                raise RuntimeError(f"step process interrupted: {exc!r}") from exc
            if previous is not None:
                await previous
            await deliver_and_ack(stream, batch, outcomes)
            stats.latency.observe(time.monotonic() - started)

        try:
            async for batch in stream.noack_take(  # type: ignore[attr-defined]
                BATCH_MAX_EVENTS, within=BATCH_WITHIN_SECS
            ):
                started = time.monotonic()
                records = [
                    (m.key, m.value, m.topic, m.partition, m.offset)
                    for m in (e.message for e in batch)
                ]
                if pool is not None:
                    processing = pool.submit(records)
                else:
                    processing = asyncio.get_running_loop().create_future()
                    processing.set_result(process_batch(records, steps))
                previous = inflight[-1] if inflight else None
                task = asyncio.ensure_future(finish(batch, processing, previous, started))
                task.add_done_callback(_exit_if_failed)  # also when no batch follows
                inflight.append(task)
                while len(inflight) > depth or (inflight and inflight[0].done()):
                    await asyncio.shield(inflight.popleft())
            for remaining in inflight:
                await asyncio.shield(remaining)
        except asyncio.CancelledError:  # worker stopping: let the batches in flight finish
            pending = [t for t in inflight if not t.done()]
            if pending:
                _, not_done = await asyncio.wait(pending, timeout=DELIVERY_ON_STOP_SECS)
                if not_done:
                    log.warning(
                        "stopping with %d batch(es) unacknowledged; they will be redelivered",
                        len(not_done),
                    )
                    for t in not_done:
                        t.cancel()
            raise
        except BaseException:
            _exit_unacked()
        finally:
            if pool is not None:
                pool.shutdown()

    return app


def _failed_future(exc: BaseException) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


def _rejected(outcome: Outcome, source: Any, exc: Exception) -> Outcome | None:
    """What to send instead of ``outcome`` after Kafka refused it with ``exc``; None: retry it
    as it is (a transient failure, or a dead letter with nothing left to shed)."""
    if not is_permanent(exc):
        return None
    if outcome.kind == "forward":
        headers = dead_letter_headers(
            "deliver", "kafka_rejected", exc, source.topic, source.partition, source.offset
        )
        return Outcome("dead_letter", source.key, source.value, headers, "kafka_rejected")
    if outcome.value is None:
        return None  # even the bare dead letter is refused: keep retrying, loudly
    headers = [(k, v) for k, v in outcome.headers if k != H_REASON]
    headers.append((H_REASON, b"kafka_rejected_value_dropped"))
    return Outcome("dead_letter", outcome.key, None, headers, "kafka_rejected_value_dropped")


def process_batch(records: list[Record], steps: list[Step]) -> list[Outcome]:
    """One outcome per ``(key, value, topic, partition, offset)`` record, in order."""
    return [
        process_record(key, value, topic=topic, partition=partition, offset=offset, steps=steps)
        for key, value, topic, partition, offset in records
    ]


class StepPool:
    """Processes that run the steps on whole batches, so a worker uses more than one core.

    The agent's process keeps Kafka, Faust and delivery; each step process builds the chain
    from the same ``[pipeline]`` settings. The processes are spawned (not forked: the worker
    has threads) and die with the worker. A step process that dies fails the batch, and the
    worker exits without acking it (redelivered after a restart).
    """

    def __init__(self, processes: int, pipeline: dict[str, Any]) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_step_process,
            initargs=(pipeline,),
        )

    def submit(self, records: list[Record]) -> asyncio.Future[list[Outcome]]:
        return asyncio.get_running_loop().run_in_executor(
            self._executor, _process_in_step_process, records
        )

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_STEPS: list[Step] = []  # the chain, in a step process


def _init_step_process(pipeline: dict[str, Any]) -> None:
    import signal

    from auditpipe.broker import die_with_parent

    # Ctrl-C in a terminal and systemd's stop signal the whole group: the worker stops in order
    # (finishing the batches in flight, here too) and then ends this process; or it dies, and
    # the kernel ends this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    _STEPS[:] = chain_for(pipeline)


def _process_in_step_process(records: list[Record]) -> list[Outcome]:
    return process_batch(records, _STEPS)


def _exit_unacked(exc: BaseException | None = None) -> None:
    # Unacked records are redelivered to the next worker; dying is what keeps them so (a dead
    # agent in a live-looking worker would hold its partitions forever).
    log.critical(
        "processor agent failed; exiting so the batch is redelivered", exc_info=exc or True
    )
    logging.shutdown()
    os._exit(70)


def _exit_if_failed(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        _exit_unacked(exc)


estimate_size_in_bytes = DefaultRecordBatchBuilder.estimate_size_in_bytes


class WorkerStats:
    """Process-local counters of outcomes (forwarded, dead-lettered, dropped by reason)."""

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.retries = 0
        self.errors: Counter[str] = Counter()
        self.latency = Latency()  # a batch: taken from the stream to acknowledged

    def observe(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self.outcomes[(o.kind, o.reason if o.kind != "forward" else "")] += 1


def batch_counts(outcomes: list[Outcome]) -> Counter[str]:
    """``model:NAME`` and ``tenant:NAME`` counts of the forwarded outcomes of one batch."""
    out: Counter[str] = Counter()
    for o in outcomes:
        if o.kind == "forward":
            model, tenant = o.dimensions
            out[f"model:{model or ''}"] += 1
            if tenant:
                out[f"tenant:{tenant}"] += 1
    return out


def processor_stage(
    stats: WorkerStats,
    counts: Callable[[], dict[str, int]],
    lag: Callable[[], dict[str, int]] = dict,
) -> Source:
    """The worker's counters, its share of the counts table and its consumer lag on the raw
    topic as the stage ``processor``."""

    def read() -> list[Stage]:
        by_kind: dict[str, dict[str, int]] = {"forward": {}, "dead_letter": {}, "drop": {}}
        for (kind, reason), n in stats.outcomes.items():
            by_kind.setdefault(kind, {})[reason] = n
        dims = {}
        for key, n in counts().items():
            dim, _, value = key.partition(":")
            dims[(dim, value)] = n
        return [
            Stage(
                "processor",
                received=sum(stats.outcomes.values()),
                sent=sum(by_kind["forward"].values()),
                retries=stats.retries,
                dropped=by_kind["drop"],
                dead_lettered=by_kind["dead_letter"],
                errors=dict(stats.errors),
                by_dimension=dims,
                lag=lag(),
                latency={"process": stats.latency.snapshot()},
            )
        ]

    return read


def run_worker(settings: Settings) -> None:
    """Run a processor worker in the foreground until SIGINT/SIGTERM.

    Logging is auditpipe's (``auditpipe.logs.setup``, done by the command): Faust's worker is
    told not to install its own, so its records go through the same handler and format.
    """
    from faust.worker import Worker

    app = create_app(settings)
    worker = Worker(app, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.spinner = None  # its terminal escapes would garble a non-terminal stderr
    worker.execute_from_commandline()
