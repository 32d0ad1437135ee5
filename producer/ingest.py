"""``auditpipe ingest``: audit JSONL from files or stdin into the pipeline, resumable.

What a line is and how it becomes an AuditEvent: :mod:`auditpipe.producer._records`. This
module reads, follows and remembers:

- **Files** are read from the position saved in the state file (a new file: from the start, or
  its end with ``start_at = "end"``). ``--follow`` keeps reading like ``tail -F``: a file that
  is not there yet is waited for; a rotation by rename (the path now names another file) is
  noticed, the old file is read to its end for ``rotate_wait_secs`` more (what the writer adds
  before it reopens), then the new one from its start; a truncation (copytruncate) starts the
  file again at 0; a last line without its newline waits for it.
- **Delivery before position**: lines go out in batches; a batch's events are handed to the
  producer and ``flush()`` waits until each was acknowledged by Kafka (or written to stdout, or
  spooled to disk) before the batch's end offsets are saved. The state file (JSON, a few hundred
  bytes per file) is replaced atomically (temporary file, fsync, rename). A crash between the
  two replays the batch on restart with the same deterministic event ids, which the sinks
  deduplicate: no gap, and no duplicate where it counts.
- **Restart across a rotation**: positions are kept per file identity (device, inode and a
  hash of the file's first bytes), so a file rotated while ingest was down is found again by
  its inode in the same directory and read to its end before the new one.
- **Lines that are not records** are counted by reason and skipped, or dead-lettered to
  ``kafka.dlq_topic`` (``on_other`` / ``on_malformed = "dlq"``) with the original line as the
  value and the reason, file and byte offset in the ``auditpipe.dlq.*`` headers (stage
  ``ingest``; the file path stands in the topic header, -1 in the partition header).

Stdin (``-``) has no position: it is read to its end (or until stopped).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from auditpipe.dlq import dead_letter_headers
from auditpipe.errors import AuditpipeError, ConfigError
from auditpipe.kafka import client_kwargs, producer_kwargs, start_client
from auditpipe.settings import IngestSettings, Settings

from ._producer import AuditProducer
from ._records import LineFramer, read_line

_READ_BYTES = 1 << 20
_HEAD_BYTES = 256
_PROGRESS_SECS = 10.0
STATE_VERSION = 1


def default_state_file(paths: Iterable[str]) -> str:
    """``$XDG_STATE_HOME/auditpipe/ingest-<hash of the absolute paths>.json``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")  # fmt: skip
    key = hashlib.sha256("\n".join(sorted(os.path.abspath(p) for p in paths)).encode())
    return os.path.join(base, "auditpipe", f"ingest-{key.hexdigest()[:12]}.json")


@dataclass
class Line:
    data: bytes  # without the newline
    start: int  # byte offset of the line in its file
    end: int  # offset after its newline (what a saved position may advance to)
    tracked: Tracked | None  # None for stdin
    too_long: bool = False  # longer than max_line_bytes: skipped, its data left out


@dataclass
class Tracked:
    """One open file of a path: the current one, or a rotated one being read to its end."""

    path: str  # the name it was opened under
    fd: int
    dev: int
    ino: int
    pos: int  # bytes read from the fd
    committed: int  # offset saved (or to be saved): every line before it was delivered
    head: str = ""
    buffer: bytes = b""  # the unfinished last line
    framer: LineFramer = field(default_factory=LineFramer)
    drain_until: float | None = None  # rotated: read until EOF after this monotonic time
    processed: int = 0  # end offset of the last line handed over (not yet flushed)
    skipping: bool = False  # inside a line longer than max_line_bytes: drop up to its newline

    def state(self) -> dict[str, Any]:
        return {"dev": self.dev, "ino": self.ino, "offset": self.committed, "head": self.head}


class State:
    """The state file: ``{"version": 1, "files": {abs path: [entries]}}``, one entry per file
    identity (the current file first, then rotated ones still being read)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.files: dict[str, list[dict[str, Any]]] = {}
        if path and os.path.exists(path):
            try:
                with open(path, "rb") as fh:
                    data = json.load(fh)
                self.files = {str(k): list(v) for k, v in data.get("files", {}).items()}
            except (OSError, ValueError, AttributeError) as exc:
                raise ConfigError(
                    f"ingest state file {path} is unreadable ({exc}); move it away to start over"
                ) from None

    def save(self) -> None:
        if not self.path:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        data = json.dumps({"version": STATE_VERSION, "files": self.files}, indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        try:  # the rename itself survives a power cut once the directory is synced
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def _head(fd: int, size: int) -> str:
    """Hash of the file's first bytes (up to ``_HEAD_BYTES``): tells a file from another that
    got the same inode, or a truncated-and-rewritten one."""
    data = os.pread(fd, min(size, _HEAD_BYTES), 0)
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


def _head_matches(fd: int, saved: str) -> bool:
    try:
        length = int(saved.split(":", 1)[0])
    except ValueError:
        return False
    data = os.pread(fd, length, 0)
    return len(data) == length and f"{length}:{hashlib.sha256(data).hexdigest()[:16]}" == saved


class FileFollower:
    """Reads one path (see the module docstring); :meth:`poll` returns the complete lines that
    became available, oldest file first."""

    def __init__(
        self, path: str, saved: list[dict[str, Any]] | None, cfg: IngestSettings, follow: bool
    ) -> None:
        self.path = os.path.abspath(path)
        self.cfg = cfg
        self.follow = follow
        self.files: list[Tracked] = []  # rotated ones first, the current one last
        self.counts: collections.Counter[str] = collections.Counter()  # rotations, truncations
        self._saved = list(saved or [])
        self._first_open = not saved

    # -- opening --------------------------------------------------------------------------------

    def _open(self, name: str, st: os.stat_result | None = None) -> Tracked | None:
        try:
            fd = os.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditpipeError(f"cannot read {name}: {exc.strerror}") from None
        st = os.fstat(fd)
        return Tracked(name, fd, st.st_dev, st.st_ino, 0, 0)

    def _resume(self, t: Tracked, entry: dict[str, Any] | None) -> None:
        size = os.fstat(t.fd).st_size
        offset = 0
        if entry is not None and _head_matches(t.fd, str(entry.get("head", ""))):
            offset = int(entry.get("offset", 0))
            if offset > size:  # truncated while we were away
                offset = 0
                self.counts["truncations"] += 1
        elif entry is None and self._first_open and self.cfg.start_at == "end":
            offset = size
        t.pos = t.committed = t.processed = offset
        t.head = _head(t.fd, size) if size else ""

    def start(self) -> None:
        """Open the current file and, after a restart, rotated files not read to their end."""
        current = self._open(self.path)
        if current is None and not self.follow:
            raise AuditpipeError(f"{self.path}: no such file")
        for entry in self._saved:
            if current is not None and (entry.get("dev"), entry.get("ino")) == (
                current.dev, current.ino):  # fmt: skip
                continue
            rotated = self._find_rotated(entry)  # rotated while we were away?
            if rotated is not None:
                self._resume(rotated, entry)
                rotated.drain_until = time.monotonic()
                self.files.append(rotated)
                self.counts["rotations"] += 1
            elif current is not None or len(self._saved) > 1:
                self.counts["rotated_files_lost"] += 1
        if current is not None:
            self._resume(current, self._entry_for(current))
            self._first_open = False
            self.files.append(current)

    def _entry_for(self, t: Tracked) -> dict[str, Any] | None:
        for entry in self._saved:
            if (entry.get("dev"), entry.get("ino")) == (t.dev, t.ino):
                return entry
        return None

    def _find_rotated(self, entry: dict[str, Any]) -> Tracked | None:
        """The file of a saved entry, by inode, beside the path (or beside the file a symlinked
        path points to: Kubernetes' /var/log/containers links into /var/log/pods)."""
        directories = {os.path.dirname(self.path), os.path.dirname(os.path.realpath(self.path))}
        for directory in sorted(directories):
            try:
                items = list(os.scandir(directory))
            except OSError:
                continue
            for item in items:
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_ino == entry.get("ino") and st.st_dev == entry.get("dev"):
                    t = self._open(item.path)
                    if t is not None and _head_matches(t.fd, str(entry.get("head", ""))):
                        return t
                    if t is not None:
                        os.close(t.fd)
        return None

    # -- reading --------------------------------------------------------------------------------

    def poll(self) -> list[Line]:
        """Lines that are complete now; notices new files, rotation and truncation."""
        if not self.files or self.files[-1].drain_until is not None:
            fresh = self._open(self.path)
            if fresh is not None and not any(
                (t.dev, t.ino) == (fresh.dev, fresh.ino) for t in self.files
            ):
                self._resume(fresh, self._entry_for(fresh))
                self._first_open = False
                self.files.append(fresh)
            elif fresh is not None:
                os.close(fresh.fd)
        lines: list[Line] = []
        for t in list(self.files):
            lines.extend(self._read(t))
        if self.follow:
            self._check_rotation()
        return lines

    def _read(self, t: Tracked) -> list[Line]:
        size = os.fstat(t.fd).st_size
        if size < t.pos or (t.head and not _head_matches(t.fd, t.head)):
            # copytruncate (or truncated and written again): the file starts over
            self.counts["truncations"] += 1
            t.pos = t.committed = t.processed = 0
            t.buffer, t.skipping, t.head = b"", False, ""
            t.framer.reset()
        if size and (not t.head or int(t.head.split(":", 1)[0]) < min(size, _HEAD_BYTES)):
            t.head = _head(t.fd, size)
        out: list[Line] = []
        limit = self.cfg.max_line_bytes
        while t.pos < size:
            data = os.pread(t.fd, min(_READ_BYTES, size - t.pos), t.pos)
            if not data:
                break
            start = t.pos - len(t.buffer)
            t.pos += len(data)
            if t.skipping:
                newline = data.find(b"\n")
                if newline < 0:
                    continue
                start += newline + 1
                data, t.skipping = data[newline + 1 :], False
                out.append(Line(b"", start, start, t, too_long=True))
            pieces = (t.buffer + data).split(b"\n")
            t.buffer = pieces.pop()
            for piece in pieces:
                end = start + len(piece) + 1
                if len(piece) > limit:
                    out.append(Line(b"", start, end, t, too_long=True))
                else:
                    out.append(Line(piece, start, end, t))
                start = end
            if len(t.buffer) > limit:  # drop it and what follows up to the next newline
                t.buffer, t.skipping = b"", True
        if t.buffer and (not self.follow or self._drained(t)):
            # the file ended without a newline and nothing more will come
            out.append(Line(t.buffer, t.pos - len(t.buffer), t.pos, t))
            t.buffer = b""
        return out

    def _drained(self, t: Tracked) -> bool:
        return t.drain_until is not None and time.monotonic() >= t.drain_until

    def _check_rotation(self) -> None:
        current = self.files[-1] if self.files else None
        if current is not None and current.drain_until is None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) != (current.dev, current.ino):
                current.drain_until = time.monotonic() + self.cfg.rotate_wait_secs
                self.counts["rotations"] += 1
        for t in list(self.files[:-1] if self.files and self.files[-1].drain_until is None
                      else self.files):  # fmt: skip
            if self._drained(t) and t.pos >= os.fstat(t.fd).st_size and not t.buffer:
                if t.processed >= t.pos:
                    self._close(t)

    def _close(self, t: Tracked) -> None:
        os.close(t.fd)
        self.files.remove(t)

    def close(self) -> None:
        for t in list(self.files):
            self._close(t)

    def state(self) -> list[dict[str, Any]]:
        """Entries for the state file: the current file first."""
        return [t.state() for t in reversed(self.files)]


class StdinReader:
    """Lines of stdin (no position). A daemon thread reads it, so a stop never waits for input
    that does not come."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.buffer = b""
        self.skipping = False
        self.eof = False
        self.framer = LineFramer()
        self._queue: asyncio.Queue[bytes] | None = None

    def _start(self) -> asyncio.Queue[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        fd = sys.stdin.fileno()

        def reader() -> None:
            while True:
                try:
                    data = os.read(fd, _READ_BYTES)
                except OSError:
                    data = b""
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                if not data:
                    return

        threading.Thread(target=reader, name="auditpipe-ingest-stdin", daemon=True).start()
        return queue

    async def read(self) -> list[Line]:
        if self._queue is None:
            self._queue = self._start()
        data = await self._queue.get()
        if not data:
            self.eof = True
            rest, self.buffer = self.buffer, b""
            return [Line(rest, 0, 0, None)] if rest and not self.skipping else []
        if self.skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data, self.skipping = data[newline + 1 :], False
        pieces = (self.buffer + data).split(b"\n")
        self.buffer = pieces.pop()
        out = [Line(b"", 0, 0, None, too_long=True) if len(p) > self.max_line_bytes
               else Line(p, 0, 0, None) for p in pieces]  # fmt: skip
        if len(self.buffer) > self.max_line_bytes:
            self.buffer, self.skipping = b"", True
            out.append(Line(b"", 0, 0, None, too_long=True))
        return out


@dataclass
class IngestReport:
    lines: int = 0
    records: int = 0
    other: collections.Counter[str] = field(default_factory=collections.Counter)
    malformed: collections.Counter[str] = field(default_factory=collections.Counter)
    dead_lettered: int = 0
    malformed_dead_lettered: int = 0
    files: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def malformed_skipped(self) -> int:
        return sum(self.malformed.values()) - self.malformed_dead_lettered

    def summary(self) -> str:
        parts = [f"lines={self.lines}", f"records={self.records}",
                 f"other={dict(self.other)}", f"malformed={dict(self.malformed)}",
                 f"dead_lettered={self.dead_lettered}"]  # fmt: skip
        if self.files:
            parts.append(f"files={dict(self.files)}")
        return " ".join(parts)


class Ingest:
    """One ``auditpipe ingest`` run: sources -> records -> producer (+ DLQ) -> state."""

    def __init__(
        self,
        settings: Settings,
        producer: AuditProducer,
        paths: list[str],
        *,
        follow: bool = False,
        state_file: str | None = None,
        use_state: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.ingest
        self.producer = producer
        self.follow = follow
        self.paths = paths or ["-"]
        files = [p for p in self.paths if p != "-"]
        if self.paths.count("-") > 1 or (files and "-" in self.paths and follow):
            raise ConfigError("ingest: stdin (-) can be read once, and not with --follow files")
        state_path = None
        if files and use_state:
            state_path = state_file or self.cfg.state_file or default_state_file(files)
        self.state = State(state_path)
        self.followers = [
            FileFollower(p, self.state.files.get(os.path.abspath(p)), self.cfg, follow)
            for p in files
        ]
        self.stdin = StdinReader(self.cfg.max_line_bytes) if "-" in self.paths else None
        pcfg = settings.producer
        self._allow = frozenset(h.lower() for h in pcfg.header_allowlist)
        self._batch = max(1, min(self.cfg.batch_max_lines, pcfg.queue_max_events))
        self.report = IngestReport()
        self._stop = asyncio.Event()
        self._progress = progress
        self._dlq: Any = None
        self._dlq_pending: list[asyncio.Future[Any]] = []
        if "dlq" in (self.cfg.on_other, self.cfg.on_malformed):
            client_kwargs(settings.kafka)  # bootstrap, certificates: fail before reading
        if not producer.enabled:
            raise ConfigError("producer.enabled is false (AUDITPIPE_ENABLED=0): nothing would be "
                              "published; unset it to ingest")  # fmt: skip

    def stop(self) -> None:
        """Finish the batch in hand, deliver it, save the positions, return (signal-safe)."""
        self._stop.set()

    async def run(self) -> IngestReport:
        for f in self.followers:
            f.start()
        if self._dlq is None and "dlq" in (self.cfg.on_other, self.cfg.on_malformed):
            from aiokafka import AIOKafkaProducer

            self._dlq = AIOKafkaProducer(**producer_kwargs(self.settings.kafka,
                                                           self.settings.producer))  # fmt: skip
            await start_client(self._dlq, self.settings.kafka)
        last_progress = time.monotonic()
        try:
            while not self._stop.is_set():
                lines: list[Line] = []
                for f in self.followers:
                    lines.extend(f.poll())
                if self.stdin is not None and not self.stdin.eof:
                    lines.extend(await self._read_stdin())
                for i in range(0, len(lines), self._batch):
                    await self._deliver(lines[i : i + self._batch])
                if not lines:
                    await self._commit([])  # rotated files closed, truncations noted
                stdin_done = self.stdin is None or self.stdin.eof
                if stdin_done and not lines and (not self.follow or not self.followers):
                    break
                if self._progress and time.monotonic() - last_progress >= _PROGRESS_SECS:
                    last_progress = time.monotonic()
                    self._progress(self.report.summary())
                if not lines:
                    try:
                        await asyncio.wait_for(self._stop.wait(), self.cfg.poll_interval_secs)
                    except TimeoutError:
                        pass
        finally:
            for f in self.followers:
                self.report.files.update(f.counts)
                f.close()
            if self._dlq is not None:
                await self._dlq.stop()
        return self.report

    async def _read_stdin(self) -> list[Line]:
        assert self.stdin is not None
        read = asyncio.ensure_future(self.stdin.read())
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if read in done:
            return read.result()
        read.cancel()  # the reading thread finishes its os.read on its own
        return []

    async def _deliver(self, lines: list[Line]) -> None:
        """Map, emit and flush one batch, then save the positions it reached."""
        cfg, report = self.cfg, self.report
        pcfg = self.settings.producer
        for line in lines:
            report.lines += 1
            framer = line.tracked.framer if line.tracked is not None else (
                self.stdin.framer if self.stdin is not None else LineFramer())  # fmt: skip
            if line.tracked is not None:
                line.tracked.processed = line.end
            if line.too_long:
                report.malformed["too_long"] += 1
                continue
            if not line.data.strip():
                report.other["empty"] += 1
                continue
            framed = framer.feed(line.data, line.start)
            if framed is None:
                continue
            content, ts = framed
            kind, value, message = read_line(
                content, pcfg, self._allow, default_endpoint=cfg.default_endpoint, ts=ts
            )
            if kind == "record":
                report.records += 1
                self._emit(value)
            elif kind == "other":
                report.other[value] += 1
                if cfg.on_other == "dlq":
                    self._dead_letter(line, content, value, "not an audit record")
            else:
                report.malformed[value] += 1
                if cfg.on_malformed == "dlq":
                    self._dead_letter(line, content, value, message)
                    report.malformed_dead_lettered += 1
        await self._commit(lines)

    def _emit(self, event: dict[str, Any]) -> None:
        """Hand one event to the producer. A batch fits in its queue (batches are at most
        ``queue_max_events`` and each is flushed before the next), so a refusal means it
        stopped."""
        producer = self.producer
        if not producer.emit(event):
            raise AuditpipeError(f"the producer refused an event: {producer.stats()['dropped']}")

    def _dead_letter(self, line: Line, content: bytes, reason: str, message: str) -> None:
        assert self._dlq is not None
        source = line.tracked.path if line.tracked is not None else "-"
        headers = dead_letter_headers("ingest", reason, ValueError(message), source, -1,
                                      line.start)  # fmt: skip
        send = self._dlq.send(self.settings.kafka.dlq_topic, content, key=source.encode(),
                              headers=headers)  # fmt: skip
        self._dlq_pending.append(asyncio.ensure_future(send))
        self.report.dead_lettered += 1

    async def _commit(self, lines: list[Line]) -> None:
        """Wait until everything handed over is delivered, then save the positions."""
        if lines:
            while not await asyncio.to_thread(self.producer.flush, 5.0):
                if not self.producer._accepting:
                    raise AuditpipeError("the producer stopped before delivering a batch")
                if self._progress:
                    self._progress("waiting for the producer to deliver (Kafka slow or away?)")
                if self._stop.is_set():
                    return  # not delivered: not saved; read again next time
            if self._dlq_pending:
                sends, self._dlq_pending = self._dlq_pending, []
                for fut in await asyncio.gather(*sends):  # each send() gave a delivery future
                    await fut
        changed = False
        for f in self.followers:
            for t in f.files:
                pending = t.framer.pending_start()
                target = t.processed if pending is None else min(pending, t.processed)
                if target != t.committed:
                    t.committed, changed = target, True
            entries = f.state()
            if self.state.files.get(f.path) != entries:
                self.state.files[f.path], changed = entries, True
        if changed:
            self.state.save()


def run_ingest(
    settings: Settings,
    paths: list[str],
    *,
    follow: bool,
    state_file: str | None,
    use_state: bool,
) -> int:
    """The CLI entry: exit 0, or 3 when malformed records were skipped (not dead-lettered)."""
    producer = AuditProducer(settings).start()

    def progress(text: str) -> None:
        print(f"[auditpipe ingest] {text}", file=sys.stderr, flush=True)

    ingest = Ingest(settings, producer, paths, follow=follow, state_file=state_file,
                    use_state=use_state, progress=progress)  # fmt: skip
    if ingest.state.path:
        progress(f"positions in {ingest.state.path}")

    async def main() -> IngestReport:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, ingest.stop)
        return await ingest.run()

    from auditpipe.metrics import ingest_stage, make_registry, producer_stage, serve_thread

    m = settings.metrics
    registry = make_registry(ingest_stage(ingest), producer_stage(producer))[0]
    server = serve_thread(registry, m.host, m.port)  # [metrics] port; None: not served
    try:
        report = asyncio.run(main())
    finally:
        stats = producer.stop()
        if server is not None:
            server.close()
    progress(f"{report.summary()} producer: sent={stats['sent']} spooled={stats['spooled']} "
             f"dropped={stats['dropped']}")  # fmt: skip
    return 3 if report.malformed_skipped else 0
