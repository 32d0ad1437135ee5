"""``auditpipe soak``: steady traffic through the whole pipeline, faults on a schedule, and an
exact per-event account at the end, read back from the store itself.

What runs (the embedded default): the embedded broker behind a :class:`TcpProxy` (every client
connects through it: the broker advertises the proxy's port), a processor worker and the sink
runner as child processes (``auditpipe process`` / ``auditpipe sink NAME`` with a settings
file written for them), and, in this process, the demo OpenAI-compatible server with
:class:`AuditMiddleware` and an :class:`AuditProducer`, driven by the official ``openai``
client. With ``kafka.bootstrap`` set (``AUDITPIPE_KAFKA_BOOTSTRAP``) the configured cluster is
used instead of the embedded broker; the processor and sink it starts join the deployment's
consumer groups, and ``--no-workers`` starts neither (the deployment's own do the work).

Every request carries a soak id (``soak-<run>-<seq>``) as ``x-request-id`` (so it is the
event's ``request_id``) and in ``metadata.soak_id``. The mix: non-streaming and streaming
requests, ``store: false`` ones (must not arrive), requests for a model that does not exist
(404 from the server: an upstream error, captured with its status), and streams the client
drops after the first chunk (captured as incomplete).

Faults (``--faults``, run one at a time, every ``--fault-every`` seconds, each for
``--fault-secs``), each logged with its start and end:

- ``broker``: the TCP proxy aborts every connection to the broker and refuses new ones.
- ``processor`` / ``sink``: ``kill -9`` of the child, restarted when the fault ends.
- ``store``: file sink: the sink process's file-size limit (``RLIMIT_FSIZE``, set with
  ``prlimit``) is lowered to 1 byte, so every append fails with ``EFBIG`` from the kernel, as
  an unwritable store (root ignores permissions, so a read-only directory would not do).
  postgres sink: the embedded server (pgserver, data in the work directory) is stopped and
  started again; a server given by a TCP ``dsn`` is cut off by a TCP proxy in front of it.
- ``disk``: the producer's spool refuses every write with ``ENOSPC`` (its write function is
  swapped; the spool's own ``disk_full`` path runs) while the broker is cut, so events must go
  to the spool and cannot: they are dropped and counted (``disk_full``). The refused records
  are decoded, so the account knows exactly which soak ids were dropped.

Accounting (after traffic stops and the pipeline drained, or ``--drain-secs`` passed):
``expected`` are the requests the producer must capture (``store: true``, or every request with
``producer.capture = "all"``; none when the producer is disabled; minus what a configured
``sample`` step drops). Each expected id is ``delivered`` (in the store), ``dead_lettered``
(in the DLQ topic, with its reason), ``dropped`` (identified by the disk fault, or counted by
the producer's drop counters for a reason) or ``lost``. ``duplicates`` counts store rows beyond
the first per soak id; ``unexpected`` counts store rows of requests that must not have been
stored. Exit 0 only when lost, duplicates and unexpected are all 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .broker import EmbeddedBroker, free_port, popen_child, tune_for_embedded_broker
from .dev import stop_process
from .errors import ConfigError
from .kafka import client_kwargs, ensure_topics
from .settings import KafkaSettings, Settings, load_settings
from .tcpproxy import TcpProxy

FAULT_KINDS = ("broker", "processor", "sink", "store", "disk")
SOAK_SINKS = ("file", "postgres")

#: Traffic mix: (kind, share). ``no_store`` must not arrive; the others must.
MIX = (("plain", 0.35), ("stream", 0.30), ("no_store", 0.10), ("error", 0.10),
       ("disconnect", 0.15))  # fmt: skip


@dataclass
class SoakOptions:
    seconds: float = 60.0
    rate: float = 10.0
    concurrency: int = 8
    sink: str = "file"
    faults: list[str] = field(default_factory=lambda: list(FAULT_KINDS))
    fault_every: float = 30.0
    fault_secs: float = 10.0
    drain_secs: float = 120.0
    workers: bool = True
    workdir: str | None = None
    config_path: str | None = None
    origin: str = "settings"
    seed: int | None = None
    run_id: str | None = None  # default: random (soak ids are soak-<run_id>-<seq>)
    #: test hook: called with the store reader after draining, before the final count
    before_count: Callable[[Any], None] | None = None


def progress(message: str) -> None:
    print(f"[auditpipe soak] {message}", file=sys.stderr, flush=True)


def parse_faults(text: str) -> list[str]:
    """``all``, ``none`` or a comma list of :data:`FAULT_KINDS`; names the bad entry."""
    text = text.strip()
    if text in ("all", ""):
        return list(FAULT_KINDS)
    if text == "none":
        return []
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    for kind in kinds:
        if kind not in FAULT_KINDS:
            raise ConfigError(
                f"--faults: unknown fault {kind!r}; use all, none or a comma list of "
                f"{', '.join(FAULT_KINDS)}"
            )
    return kinds


# -- settings for the children ----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def settings_toml(settings: Settings) -> str:
    """The settings as a TOML file the children load (inline tables below the first level)."""
    lines = []
    for table, values in settings.model_dump(mode="json", exclude_none=True).items():
        if not isinstance(values, dict):
            lines.append(f"{json.dumps(table)} = {_toml_value(values)}")
            continue
        lines.append(f"[{table}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _with(settings: Settings, table: str, **values: Any) -> Settings:
    current = getattr(settings, table)
    return settings.model_copy(update={table: current.model_copy(update=values)})


# -- child processes ---------------------------------------------------------------------------


class Child:
    """``auditpipe process`` or ``auditpipe sink NAME``, killable and restartable."""

    def __init__(self, name: str, args: list[str], config: Path, log_dir: Path) -> None:
        self.name = name
        self.cmd = [sys.executable, "-m", "auditpipe", *args, "--config", str(config)]
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITPIPE_")}
        with open(self.log_path, "ab") as log:
            self.proc = popen_child(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.starts += 1
        return self.proc.pid

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.returncode

    def stop(self, timeout_secs: float = 15.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        return stop_process(proc, timeout_secs)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


# -- the store, read back ----------------------------------------------------------------------


class FileStore:
    """Reads the file sink's JSONL (the active file and its rotated, maybe gzipped, segments)."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self._needle = prefix.encode()
        self.first_seen: dict[str, float] = {}
        self._pos = 0
        self._inode: int | None = None
        self._partial = b""

    def _ids(self, data: bytes) -> list[str]:
        out = []
        for line in data.splitlines():
            if self._needle not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            sid = soak_id_of(event, self.prefix)
            if sid is not None:
                out.append(sid)
        return out

    def poll(self, candidates: set[str] | None = None) -> int:
        """Read what was appended since the last poll; note when each soak id first showed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        if st.st_ino != self._inode or st.st_size < self._pos:  # rotated: a new active file
            self._inode, self._pos, self._partial = st.st_ino, 0, b""
        if st.st_size == self._pos:
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(self._pos)
            data = fh.read(st.st_size - self._pos)
        self._pos += len(data)
        data, _, self._partial = (self._partial + data).rpartition(b"\n")
        now = time.time()
        new = 0
        for sid in self._ids(data):
            if sid not in self.first_seen:
                self.first_seen[sid] = now
                new += 1
        return new

    def segments(self) -> list[Path]:
        stem, suffix = self.path.stem, self.path.suffix
        rotated = sorted(self.path.parent.glob(f"{stem}.*{suffix}*"))
        return [p for p in rotated if p != self.path] + [self.path]

    def count(self) -> Counter[str]:
        """Rows per soak id in the whole store (every segment)."""
        rows: Counter[str] = Counter()
        for seg in self.segments():
            try:
                opener: Any = gzip.open if seg.name.endswith(".gz") else open
                with opener(seg, "rb") as fh:
                    rows.update(self._ids(fh.read()))
            except FileNotFoundError:
                continue
        return rows

    def delete_rows(self, sids: set[str]) -> int:
        """Remove the rows of ``sids`` from the active file (the loss test's tamper hook)."""
        kept, removed = [], 0
        for line in self.path.read_bytes().splitlines(keepends=True):
            sid = self._ids(line)
            if sid and sid[0] in sids:
                removed += 1
            else:
                kept.append(line)
        self.path.write_bytes(b"".join(kept))
        return removed


class PostgresStore:
    """Reads the postgres sink's ``requests`` table (one row per event, keyed by event_id)."""

    def __init__(self, dsn: str, schema: str, prefix: str) -> None:
        self.dsn = dsn
        self.table = f'"{schema}".requests'
        self.prefix = prefix
        self.first_seen: dict[str, float] = {}

    def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, connect_timeout=3, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def poll(self, candidates: set[str] | None = None) -> int:
        """Note when each of ``candidates`` (soak ids not seen yet) first shows."""
        if not candidates:
            return 0
        rows = self._query(
            f"SELECT DISTINCT request_id FROM {self.table} WHERE request_id = ANY(%s)",
            list(candidates),
        )
        now = time.time()
        for (sid,) in rows:
            self.first_seen.setdefault(sid, now)
        return len(rows)

    def count(self) -> Counter[str]:
        rows = self._query(
            f"SELECT request_id, count(*) FROM {self.table} WHERE request_id LIKE %s "
            "GROUP BY request_id",
            self.prefix + "%",
        )
        return Counter({sid: int(n) for sid, n in rows})

    def delete_rows(self, sids: set[str]) -> int:
        rows = self._query(
            f"DELETE FROM {self.table} WHERE request_id = ANY(%s) RETURNING id", list(sids)
        )
        return len(rows)


def soak_id_of(event: dict[str, Any], prefix: str) -> str | None:
    """The event's soak id (``prefix`` ""  matches any)."""
    rid = event.get("request_id")
    if isinstance(rid, str) and rid.startswith(prefix):
        return rid
    meta = event.get("metadata")
    sid = meta.get("soak_id") if isinstance(meta, dict) else None
    return sid if isinstance(sid, str) and sid.startswith(prefix) else None


async def read_topic(
    kafka: KafkaSettings, topic: str, group_id: str | None = None, timeout_secs: float = 20.0
) -> tuple[list[tuple[int, Any]], dict[int, int | None], dict[int, int]]:
    """Every record of ``topic`` from its start to the end offsets seen when reading began, as
    ``(partition, record)``; with the offsets ``group_id`` has committed and the end offsets,
    per partition. The client is configured like every other ([kafka] TLS/SASL included)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **client_kwargs(kafka), client_id=f"{kafka.client_id}-soak-read",
        enable_auto_commit=False, group_id=group_id,
    )  # fmt: skip
    records: list[tuple[int, Any]] = []
    await consumer.start()
    try:
        await consumer.topics()  # fetches the metadata
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return records, {}, {}
        committed = {tp.partition: await consumer.committed(tp) for tp in tps} if group_id else {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_secs
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batch = await consumer.getmany(*tps, timeout_ms=500)
            records.extend((tp.partition, rec) for tp, recs in batch.items() for rec in recs)
        return records, committed, {tp.partition: end for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def read_dlq(settings: Settings, prefix: str, timeout_secs: float = 20.0) -> dict[str, str]:
    """Soak ids in the DLQ topic (from its start), with ``stage/reason`` of each."""
    from auditpipe.dlq import H_REASON, H_STAGE, headers_dict
    from auditpipe.schemas import decode

    found: dict[str, str] = {}
    records, _, _ = await read_topic(settings.kafka, settings.kafka.dlq_topic, None, timeout_secs)
    for _, rec in records:
        hdrs = headers_dict(list(rec.headers or ()))
        try:
            sid = soak_id_of(decode(rec.value), prefix)
        except Exception:
            continue
        if sid is not None:
            found[sid] = f"{hdrs.get(H_STAGE, '?')}/{hdrs.get(H_REASON, '?')}"
    return found


async def locate(
    settings: Settings, sids: set[str], groups: dict[str, str], timeout_secs: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Where each of ``sids`` is on the pipeline's topics (for the loss report): for the raw
    and the events topic, the partition and offset of its record, and the offset the topic's
    consumer group (``groups``: topic -> group id) has committed for that partition. A lost
    event found in the raw topic but not the events topic was lost by the processors; one in
    the events topic, below the sink group's committed offset, by the sink."""
    from auditpipe.schemas import decode

    kafka = settings.kafka
    found: dict[str, dict[str, Any]] = {sid: {} for sid in sids}
    for topic in (kafka.raw_topic, kafka.events_topic):
        records, committed, ends = await read_topic(kafka, topic, groups.get(topic), timeout_secs)
        for partition, rec in records:
            try:
                sid = soak_id_of(decode(rec.value), "")
            except Exception:
                continue
            if sid in found:
                found[sid][topic] = {
                    "partition": partition, "offset": rec.offset,
                    "committed": committed.get(partition), "end": ends[partition],
                }  # fmt: skip
    return found


# -- faults ------------------------------------------------------------------------------------


class DiskFault:
    """The spool's write function: ``os.write``, or ``ENOSPC`` while the fault is on. Records it
    refuses are decoded, so the soak ids dropped as ``disk_full`` are known."""

    def __init__(self, prefix: str) -> None:
        self.active = False
        self.prefix = prefix
        self.refused_ids: set[str] = set()
        self.refused_writes = 0

    def write(self, fd: int, data: bytes) -> int:
        if not self.active:
            return os.write(fd, data)
        self.refused_writes += 1
        self._note(bytes(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _note(self, data: bytes) -> None:
        from auditpipe.producer._spool import _HEADER
        from auditpipe.schemas import decode

        pos = 0
        while pos + _HEADER.size <= len(data):
            _magic, length, _crc = _HEADER.unpack_from(data, pos)
            payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
            pos += _HEADER.size + length
            with contextlib.suppress(Exception):
                sid = soak_id_of(decode(payload), self.prefix)
                if sid is not None:
                    self.refused_ids.add(sid)


@dataclass
class FaultRecord:
    kind: str
    start_s: float
    end_s: float | None = None
    start_utc: str = ""
    observed: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start_s": round(self.start_s, 2),
            "end_s": None if self.end_s is None else round(self.end_s, 2),
            "start_utc": self.start_utc,
            "observed": self.observed,
            **self.detail,
        }


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Sent:
    sid: str
    kind: str
    store: bool
    outcome: str = "pending"  # ok, http_NNN, disconnected, transport_error
    finished: float = 0.0  # wall clock, request done on the client
    finished_s: float = 0.0  # seconds since the traffic started


class Soak:
    def __init__(self, settings: Settings, options: SoakOptions) -> None:
        self.options = options
        self.run_id = options.run_id or uuid.uuid4().hex[:8]
        self.prefix = f"soak-{self.run_id}-"
        self.rng = random.Random(options.seed)
        self.sent: list[Sent] = []
        self.faults: list[FaultRecord] = []
        self.active: set[str] = set()
        self.disk = DiskFault(self.prefix)
        self.proxy: TcpProxy | None = None
        self.broker: EmbeddedBroker | None = None
        self.processor: Child | None = None
        self.sink: Child | None = None
        self.store: FileStore | PostgresStore | None = None
        self.embedded_pg: Any = None
        self._poll_lock = asyncio.Lock()  # one poll at a time (the file reader keeps a position)
        self.pg_proxy: TcpProxy | None = None
        self.t0 = 0.0
        self.settings = settings
        self.producer: Any = None
        self.external = bool(settings.kafka.bootstrap)
        self.workdir = Path(options.workdir or tempfile.mkdtemp(prefix="auditpipe-soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    # set-up ---------------------------------------------------------------------------------

    def _prepare_settings(self) -> None:
        o, s = self.options, self.settings
        if o.sink not in SOAK_SINKS:
            raise ConfigError(
                f"--sink {o.sink!r}: the soak reads back from the store itself and can read "
                f"{' and '.join(SOAK_SINKS)} (use one of those)"
            )
        table = dict(s.sinks.get(o.sink) or {})
        if o.sink == "file":
            table.setdefault("path", str(self.workdir / "events.jsonl"))
        s = s.model_copy(update={"sinks": {**s.sinks, o.sink: table}})
        s = _with(s, "producer", spool_dir=str(self.workdir / "spool"))
        if s.processors.data_dir is None:
            s = _with(s, "processors", data_dir=str(self.workdir / "faust"))
        self.settings = s
        from auditpipe.sinks import create_sink

        create_sink(o.sink, s.sinks, o.origin)  # bad sink settings fail before anything starts
        if o.sink == "file":
            self.store = FileStore(Path(table["path"]), self.prefix)

    async def _prepare_postgres(self, stack: contextlib.ExitStack) -> None:
        """The embedded PostgreSQL (in the work directory) unless a dsn is set; a TCP proxy in
        front of a TCP server (the store fault cuts it); the schema migrated."""
        from auditpipe.sinks import Migratable, create_sink

        table = dict(self.settings.sinks.get("postgres") or {})
        schema = table.get("schema_name", "auditpipe")
        dsn = table.get("dsn")
        if not dsn:
            from .embedded_pg import EmbeddedPostgres

            self.embedded_pg = EmbeddedPostgres(
                table.get("embedded_data_dir") or self.workdir / "postgres"
            )
            dsn = await asyncio.to_thread(self.embedded_pg.acquire)
            stack.callback(self._stop_embedded_pg)
            progress(f"embedded PostgreSQL in {self.embedded_pg.data_dir}")
            sink_dsn = dsn
        else:
            from psycopg.conninfo import conninfo_to_dict, make_conninfo

            info = conninfo_to_dict(dsn)
            host = str(info.get("host") or "")
            sink_dsn = dsn
            if host and not host.startswith("/") and "," not in host:
                self.pg_proxy = TcpProxy(int(info.get("port") or 5432), upstream_host=host).start()
                stack.callback(self.pg_proxy.stop)
                sink_dsn = make_conninfo(dsn, host="127.0.0.1", port=str(self.pg_proxy.port))
        table["dsn"] = sink_dsn
        self.settings = self.settings.model_copy(
            update={"sinks": {**self.settings.sinks, "postgres": table}}
        )
        sink = create_sink("postgres", self.settings.sinks, self.options.origin)
        assert isinstance(sink, Migratable)
        await sink.migrate()
        self.store = PostgresStore(str(dsn), schema, self.prefix)

    def _stop_embedded_pg(self) -> None:
        try:
            self.embedded_pg.stop()
        except Exception as exc:  # the account is done; say so rather than lose it
            progress(f"could not stop the embedded PostgreSQL: {exc}")

    def _skip_reason(self, kind: str) -> str | None:
        if kind in ("broker", "disk") and self.proxy is None:
            return "the broker is not ours (kafka.bootstrap set): no proxy between its clients"
        if kind in ("processor", "sink", "store") and not self.options.workers:
            return "--no-workers: the deployment's processes are not ours to kill"
        if (
            kind == "store"
            and self.options.sink == "postgres"
            and not (self.embedded_pg or self.pg_proxy)
        ):
            return "sinks.postgres.dsn is a Unix socket of a server not ours: nothing to cut"
        return None

    async def run(self) -> dict[str, Any]:
        o = self.options
        # the Kafka clients of this process report every refused connection of a broker
        # fault; the soak reports the faults itself
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        self._prepare_settings()
        progress(f"run {self.run_id}: work directory {self.workdir}")
        with contextlib.ExitStack() as stack:
            if not self.external:
                proxy_port = free_port()
                self.broker = EmbeddedBroker(
                    log_path=self.workdir / "broker.log", advertised_port=proxy_port
                )
                self.broker.start()
                stack.callback(self.broker.stop)
                self.proxy = TcpProxy(self.broker.port or 0, port=proxy_port).start()
                stack.callback(self.proxy.stop)
                self.settings = tune_for_embedded_broker(
                    _with(self.settings, "kafka", bootstrap=f"127.0.0.1:{proxy_port}")
                )
            if o.sink == "postgres":
                await self._prepare_postgres(stack)
            await ensure_topics(self.settings.kafka)
            where = "configured Kafka" if self.external else "embedded broker behind a TCP proxy"
            progress(f"{where} at {self.settings.kafka.bootstrap}; topics ready")
            config = self.workdir / "children.toml"
            config.write_text(settings_toml(self.settings))
            load_settings(config, env={})  # what the children will read must be valid
            if o.workers:
                self.processor = Child("processor", ["process", "--loglevel", "warning"],
                                       config, self.workdir)  # fmt: skip
                self.sink = Child("sink", ["sink", o.sink], config, self.workdir)
                self.processor.start()
                self.sink.start()
                stack.callback(self.sink.stop)
                stack.callback(self.processor.stop)
                progress(f"processor pid {self.processor.pid}, sink {o.sink} pid {self.sink.pid}")
            return await self._run_traffic()

    async def _run_traffic(self) -> dict[str, Any]:
        from auditpipe.producer import AuditProducer

        from .demo import serving_demo

        self.producer = AuditProducer(self.settings, spool_write_fn=self.disk.write).start()
        try:
            async with serving_demo(
                self.producer, "127.0.0.1", free_port(), "soak-demo-server"
            ) as port:
                return await self._traffic_and_account(port)
        finally:
            await self.producer.astop()

    async def _traffic_and_account(self, port: int) -> dict[str, Any]:
        o = self.options
        progress(
            f"traffic: {o.rate:g} req/s for {o.seconds:g}s to http://127.0.0.1:{port}/v1; "
            f"faults: {', '.join(o.faults) or 'none'} every {o.fault_every:g}s "
            f"for {o.fault_secs:g}s"
        )
        self.t0 = time.monotonic()
        poller = asyncio.create_task(self._poll_store(), name="soak-store-poller")
        faults = asyncio.create_task(self._faults(), name="soak-faults")
        reporter = asyncio.create_task(self._report(), name="soak-progress")
        try:
            await self._traffic(port)
            await faults
        finally:
            faults.cancel()
            reporter.cancel()
            with contextlib.suppress(BaseException):
                await faults
            await self._end_faults()
        progress(f"traffic done after {self.now():.1f}s: {len(self.sent)} requests; draining")
        await asyncio.to_thread(self.producer.flush, 30.0)
        dlq = await self._drain()
        poller.cancel()
        with contextlib.suppress(BaseException):
            await poller
        if o.before_count is not None:
            o.before_count(self.store)
        return await self._account(dlq)

    # traffic --------------------------------------------------------------------------------

    def _pick(self) -> str:
        r, acc = self.rng.random(), 0.0
        for kind, share in MIX:
            acc += share
            if r < acc:
                return kind
        return MIX[0][0]

    async def _traffic(self, port: int) -> None:
        import openai

        o = self.options
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                    api_key="sk-soak-not-a-secret", max_retries=0,
                                    timeout=30.0)  # fmt: skip
        sem = asyncio.Semaphore(max(1, o.concurrency))
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / max(o.rate, 0.001)
        try:
            i = 0
            while True:
                due = i * interval
                if due >= o.seconds:
                    break
                delay = due - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                task = asyncio.create_task(self._one(client, i, sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            await client.close()

    async def _one(self, client: Any, i: int, sem: asyncio.Semaphore) -> None:
        import openai

        kind = self._pick()
        sid = f"{self.prefix}{i:07d}"
        rec = Sent(sid, kind, store=kind != "no_store")
        self.sent.append(rec)
        kwargs: dict[str, Any] = {
            "model": "demo-missing" if kind == "error" else "demo-echo-1",
            "messages": [{"role": "user", "content": f"soak request {i}: what is {i} + {i}?"}],
            "store": rec.store,
            "metadata": {"soak_id": sid, "soak_run": self.run_id},
            "extra_headers": {"x-request-id": sid},
        }
        try:
            if kind in ("stream", "disconnect"):
                stream = await client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs
                )
                async for _chunk in stream:
                    if kind == "disconnect":
                        break
                await stream.close()
                rec.outcome = "disconnected" if kind == "disconnect" else "ok"
            else:
                await client.chat.completions.create(**kwargs)
                rec.outcome = "ok"
        except openai.APIStatusError as exc:
            rec.outcome = f"http_{exc.status_code}"
        except openai.OpenAIError as exc:
            rec.outcome = "transport_error"
            progress(f"request {sid} failed on the client: {exc}")
        finally:
            rec.finished, rec.finished_s = time.time(), self.now()
            sem.release()

    # faults ---------------------------------------------------------------------------------

    async def _faults(self) -> None:
        o = self.options
        if not o.faults:
            return
        kinds = list(o.faults)
        k = 0
        start = o.fault_every / 2
        while start + o.fault_secs <= o.seconds:
            delay = start - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._fault(kinds[k % len(kinds)])
            k += 1
            start += o.fault_every

    async def _fault(self, kind: str) -> None:
        o = self.options
        rec = FaultRecord(kind, self.now(), start_utc=_utc(time.time()))
        self.faults.append(rec)
        skip = self._skip_reason(kind)
        if skip:
            rec.end_s, rec.detail["skipped"] = rec.start_s, skip
            progress(f"fault {kind}: skipped ({skip})")
            return
        self.active.add(kind)
        progress(f"fault {kind}: start at {rec.start_s:.1f}s")
        try:
            if kind == "broker":
                assert self.proxy is not None
                before = (self.proxy.aborted, self.proxy.refused)
                self.proxy.cut()
                await asyncio.sleep(o.fault_secs)
                self.proxy.restore()
                rec.detail["connections_aborted"] = self.proxy.aborted - before[0]
                rec.detail["connections_refused"] = self.proxy.refused - before[1]
                rec.observed = sum(rec.detail.values()) > 0
            elif kind in ("processor", "sink"):
                child = self.processor if kind == "processor" else self.sink
                assert child is not None
                old = child.pid
                code = await asyncio.to_thread(child.kill9)
                await asyncio.sleep(o.fault_secs)
                new = child.start()
                rec.detail.update(old_pid=old, new_pid=new, exit_code=code)
                rec.observed = code == -signal.SIGKILL and new != old
            elif kind == "store":
                await self._store_fault(rec)
            elif kind == "disk":
                assert self.proxy is not None
                dropped_before = self._dropped().get("disk_full", 0)
                refused_before = self.disk.refused_writes
                self.disk.active = True
                self.proxy.cut()
                await asyncio.sleep(o.fault_secs)
                self.disk.active = False
                self.proxy.restore()
                rec.detail["spool_writes_refused"] = self.disk.refused_writes - refused_before
                rec.detail["dropped_disk_full"] = (
                    self._dropped().get("disk_full", 0) - dropped_before
                )
                rec.observed = rec.detail["spool_writes_refused"] > 0
        finally:
            self.active.discard(kind)
            rec.end_s = self.now()
            progress(f"fault {kind}: end at {rec.end_s:.1f}s {rec.detail}")

    async def _store_fault(self, rec: FaultRecord) -> None:
        if self.options.sink == "postgres":
            await self._store_fault_postgres(rec)
        else:
            await self._store_fault_file(rec)

    async def _store_fault_postgres(self, rec: FaultRecord) -> None:
        """The embedded server is stopped (``pg_ctl stop -m fast``; its data kept) and started
        again; a TCP server is cut off by the proxy in front of it."""
        recovered_before = self._log_count("recovered")
        if self.pg_proxy is not None:
            before = (self.pg_proxy.aborted, self.pg_proxy.refused)
            self.pg_proxy.cut()
            await asyncio.sleep(self.options.fault_secs)
            self.pg_proxy.restore()
            rec.detail["connections_aborted"] = self.pg_proxy.aborted - before[0]
            rec.detail["connections_refused"] = self.pg_proxy.refused - before[1]
        else:
            pg = self.embedded_pg
            await asyncio.to_thread(pg._pg_ctl, "-m", "fast", "-w", "stop")
            rec.detail["server_stopped"] = not pg.is_running()
            await asyncio.sleep(self.options.fault_secs)

            def start() -> None:
                with pg._locked():
                    pg._ensure_running()

            await asyncio.to_thread(start)
            rec.detail["server_restarted"] = pg.is_running()
        for _ in range(75):  # up to 15 s for the sink's retry (another process's log file)
            if self._log_count("recovered") > recovered_before:
                break
            await asyncio.sleep(0.2)
        rec.detail["partitions_recovered"] = self._log_count("recovered") - recovered_before
        rec.observed = rec.detail["partitions_recovered"] > 0

    async def _store_fault_file(self, rec: FaultRecord) -> None:
        """File sink: the soft RLIMIT_FSIZE of the sink process goes to 1 byte, so every append
        fails (EFBIG). Its own log is a file too, so the failures show afterwards: the runner
        logs "recovered" for each partition whose writes had failed."""
        assert self.sink is not None and self.store is not None
        pid = self.sink.pid
        assert pid is not None
        size_before = self._store_size()
        recovered_before = self._log_count("recovered")
        # the soft limit only: a lowered hard limit could not be raised again without
        # CAP_SYS_RESOURCE
        hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
        old = resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))
        rec.detail["sink_pid"] = pid
        try:
            await asyncio.sleep(self.options.fault_secs)
            rec.detail["store_grew_bytes"] = self._store_size() - size_before
        finally:
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
        for _ in range(75):  # up to 15 s for the sink's retry (another process's log file)
            if self._log_count("recovered") > recovered_before:
                break
            await asyncio.sleep(0.2)
        rec.detail["partitions_recovered"] = self._log_count("recovered") - recovered_before
        rec.observed = rec.detail["store_grew_bytes"] == 0 and rec.detail[
            "partitions_recovered"] > 0  # fmt: skip

    def _store_size(self) -> int:
        assert isinstance(self.store, FileStore)
        try:
            return self.store.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_count(self, needle: str) -> int:
        assert self.sink is not None
        try:
            return self.sink.log_path.read_text(errors="replace").count(needle)
        except OSError:
            return 0

    async def _end_faults(self) -> None:
        """Whatever was cut is restored and whatever was killed runs again."""
        self.disk.active = False
        if self.proxy is not None:
            self.proxy.restore()
        for child in (self.processor, self.sink):
            if child is not None and not child.alive():
                child.start()

    def _children(self) -> dict[str, Any]:
        return {c.name: _child_state(c) for c in (self.processor, self.sink) if c is not None}

    def _dropped(self) -> dict[str, int]:
        return dict(self.producer.stats()["dropped"]) if self.producer is not None else {}

    # watching -------------------------------------------------------------------------------

    async def _poll_store(self) -> None:
        assert self.store is not None
        while True:
            await self._poll_once()
            await asyncio.sleep(0.2)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(5)
            assert self.store is not None
            stats = self.producer.stats()
            active = ",".join(sorted(self.active)) or "-"
            progress(
                f"t={self.now():.0f}s sent={len(self.sent)} in_store={len(self.store.first_seen)} "
                f"producer: sent={stats['sent']} spool_bytes={stats['spool_bytes']} "
                f"dropped={sum(stats['dropped'].values())} faults active: {active}"
            )

    async def _poll_once(self) -> None:
        assert self.store is not None
        async with self._poll_lock:
            with contextlib.suppress(Exception):  # a store down (the store fault) is no error
                await asyncio.to_thread(self.store.poll, self._unseen())

    def _unseen(self) -> set[str]:
        assert self.store is not None
        seen = self.store.first_seen
        return {r.sid for r in self.sent if r.sid not in seen and r.outcome != "pending"}

    def _expected(self) -> set[str]:
        """Soak ids the producer must capture and the processors keep."""
        s = self.settings
        if not s.producer.enabled:
            return set()
        capture_all = s.producer.capture == "all"
        sampler = self._sampler()
        out = set()
        for rec in self.sent:
            if rec.outcome == "transport_error" or not (rec.store or capture_all):
                continue
            if sampler is not None:
                status = int(rec.outcome[5:]) if rec.outcome.startswith("http_") else 200
                event = {"request_id": rec.sid, "model": "demo-echo-1",
                         "endpoint": "/v1/chat/completions", "status_code": status,
                         "store": rec.store, "processing": []}  # fmt: skip
                if not (sampler.keep_always(event) or sampler.position(event) < sampler.rate_for(
                        event)):  # fmt: skip
                    continue
            out.add(rec.sid)
        return out

    def _sampler(self) -> Any:
        steps = (self.settings.pipeline or {}).get("steps") or []
        if "sample" not in steps:
            return None
        from auditpipe.processors.sample import SampleConfig, SampleStep

        return SampleStep(SampleConfig(**(self.settings.pipeline.get("sample") or {})))

    async def _drain(self) -> dict[str, str]:
        """Wait until every expected id is in the store, dead-lettered or dropped (or the
        deadline); returns the DLQ's soak ids."""
        assert self.store is not None
        expected = self._expected()
        deadline = time.monotonic() + self.options.drain_secs
        dlq: dict[str, str] = {}
        last = 0.0
        while True:
            await self._poll_once()
            missing = expected - self.store.first_seen.keys() - self.disk.refused_ids
            other_drops = sum(self._dropped().values()) - len(self.disk.refused_ids)
            if len(missing) <= max(0, other_drops):
                break
            if time.monotonic() - last >= 5:
                dlq = await read_dlq(self.settings, self.prefix)
                if len(missing - dlq.keys()) <= max(0, other_drops):
                    break
                progress(f"draining: {len(missing)} expected event(s) not in the store yet")
                last = time.monotonic()
            if time.monotonic() >= deadline:
                progress(f"drain deadline ({self.options.drain_secs:g}s) passed")
                break
            await asyncio.sleep(0.25)
        return await read_dlq(self.settings, self.prefix)

    # the account ----------------------------------------------------------------------------

    async def _account(self, dlq: dict[str, str]) -> dict[str, Any]:
        assert self.store is not None
        rows = await asyncio.to_thread(self.store.count)
        expected = self._expected()
        by_sid = {r.sid: r for r in self.sent}
        delivered = {sid for sid in expected if rows[sid] > 0}
        dead = {sid: why for sid, why in dlq.items() if sid in expected and sid not in delivered}
        disk_dropped = (self.disk.refused_ids & expected) - delivered - dead.keys()
        # an event whose send was in flight when the broker went away: its acknowledgement was
        # lost, the spool refused it (counted as dropped), yet Kafka had it after all
        dropped_but_delivered = len(self.disk.refused_ids & delivered)
        missing = expected - delivered - dead.keys() - disk_dropped
        stats = self.producer.stats()
        dropped: dict[str, int] = dict(stats["dropped"])
        other_drops = max(0, sum(dropped.values()) - len(self.disk.refused_ids))
        lost = max(0, len(missing) - other_drops)
        where: dict[str, dict[str, Any]] = {}
        if missing:
            runner = self.settings.runner
            groups = {
                self.settings.kafka.raw_topic: self.settings.processors.app_id,
                self.settings.kafka.events_topic: f"{runner.group_prefix}{self.options.sink}",
            }
            try:
                where = await locate(self.settings, set(sorted(missing)[:20]), groups)
            except Exception as exc:  # the account stands without it
                progress(f"could not locate the missing events on the topics: {exc!r}")
        duplicates = sum(n - 1 for n in rows.values() if n > 1)
        unexpected = sorted(sid for sid in rows if sid not in expected and sid in by_sid
                            and not by_sid[sid].store)  # fmt: skip
        fault_windows = [(f.start_s, f.end_s or f.start_s) for f in self.faults
                         if "skipped" not in f.detail]  # fmt: skip
        lat_all: list[float] = []
        lat_fault: list[float] = []
        lat_calm: list[float] = []
        for sid in delivered:
            seen = self.store.first_seen.get(sid)
            rec = by_sid[sid]
            if seen is None or not rec.finished:
                continue
            ms = max(0.0, (seen - rec.finished) * 1000)
            lat_all.append(ms)
            during = any(a <= rec.finished_s <= b for a, b in fault_windows)
            (lat_fault if during else lat_calm).append(ms)
        summary: dict[str, Any] = {
            "run": self.run_id,
            "seconds": self.options.seconds,
            "rate": self.options.rate,
            "sink": self.options.sink,
            "sent": len(self.sent),
            "outcomes": dict(Counter(r.outcome for r in self.sent)),
            "kinds": dict(Counter(r.kind for r in self.sent)),
            "expected": len(expected),
            "not_expected": len(self.sent) - len(expected),
            "delivered": len(delivered),
            "lost": lost,
            "missing_ids": sorted(missing)[:20],
            "missing_where": where,
            "duplicates": duplicates,
            "unexpected": len(unexpected),
            "dead_lettered": len(dead),
            "dead_letter_reasons": dict(Counter(dead.values())),
            "dropped": len(disk_dropped) + min(len(missing), other_drops),
            "dropped_reasons": dropped,
            "dropped_but_delivered": dropped_but_delivered,
            "producer": {k: stats[k] for k in ("emitted", "sent", "spooled", "replayed")},
            "e2e_p50_ms": _pct(lat_all, 50),
            "e2e_p99_ms": _pct(lat_all, 99),
            "e2e_max_ms": round(max(lat_all), 1) if lat_all else None,
            "e2e_during_faults": _lat(lat_fault),
            "e2e_outside_faults": _lat(lat_calm),
            "faults": [f.as_dict() for f in self.faults],
            "children": self._children(),
            "workdir": str(self.workdir),
        }
        summary["ok"] = lost == 0 and duplicates == 0 and not unexpected
        return summary


def _child_state(child: Child) -> dict[str, Any]:
    state: dict[str, Any] = {"starts": child.starts, "alive": child.alive()}
    if not state["alive"]:  # died on its own (the soak restarts only what it killed)
        state["exit_code"] = child.proc.returncode if child.proc else None
        state["log_tail"] = child.log_tail()
    return state


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[k], 1)


def _lat(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50_ms": _pct(values, 50), "p99_ms": _pct(values, 99),
            "max_ms": round(max(values), 1) if values else None}  # fmt: skip


def human_summary(s: dict[str, Any]) -> str:
    lines = [
        f"soak {s['run']}: {s['sent']} requests in {s['seconds']:g}s at {s['rate']:g}/s "
        f"to sink {s['sink']}",
        f"  expected {s['expected']} (not expected: {s['not_expected']}: store=false), "
        f"delivered {s['delivered']}, dead-lettered {s['dead_lettered']}, "
        f"dropped {s['dropped']}, LOST {s['lost']}",
        f"  duplicates {s['duplicates']}, stored but not expected {s['unexpected']}",
        f"  dead letters: {s['dead_letter_reasons'] or '-'}; "
        f"producer drops: {s['dropped_reasons'] or '-'}",
        f"  end-to-end (request done -> in the store): p50 {s['e2e_p50_ms']} ms, "
        f"p99 {s['e2e_p99_ms']} ms, max {s['e2e_max_ms']} ms; during faults "
        f"{s['e2e_during_faults']}; outside {s['e2e_outside_faults']}",
    ]
    for f in s["faults"]:
        extra = {k: v for k, v in f.items() if k not in ("kind", "start_s", "end_s", "start_utc")}
        lines.append(f"  fault {f['kind']:<9} {f['start_s']:>7}s -> {f['end_s']}s  {extra}")
    for name, state in s.get("children", {}).items():
        if not state["alive"]:
            lines.append(f"  the {name} died on its own (exit {state['exit_code']}): "
                         f"{state['log_tail']}")  # fmt: skip
    if s["missing_ids"]:
        lines.append(f"  missing (first 20): {', '.join(s['missing_ids'])}")
        for sid, where in s.get("missing_where", {}).items():
            lines.append(f"    {sid}: {where or 'on neither topic'}")
    lines.append("  RESULT: " + ("every event accounted for" if s["ok"] else "FAILED"))
    return "\n".join(lines)


async def run_soak(settings: Settings, options: SoakOptions) -> tuple[int, dict[str, Any]]:
    soak = Soak(settings, options)
    keep = options.workdir is not None
    try:
        summary = await soak.run()
    except BaseException:
        progress(f"soak aborted; files kept in {soak.workdir}")
        raise
    if summary["ok"] and not keep:
        shutil.rmtree(soak.workdir, ignore_errors=True)
        summary["workdir"] = None
    return (0 if summary["ok"] else 1), summary
