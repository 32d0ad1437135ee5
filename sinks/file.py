"""file: JSON lines on local disk, rotated by size and age, old segments gzipped and pruned.

The active file is ``path``. When the next batch would take it past ``max_bytes``, or it has
been open ``rotate_interval_secs``, it is renamed to ``STEM.YYYYMMDDTHHMMSSZ-N.SUFFIX`` beside
it, gzipped to ``...SUFFIX.gz`` when ``gzip`` is on, and all but the newest ``backups`` rotated
segments are deleted. One batch is never split across segments.

Durability (``fsync``): ``batch`` (default) fsyncs the file after every batch, so a committed
offset means the lines are on disk; ``rotate`` fsyncs only when a segment is closed, and
``never`` leaves it to the OS (both are faster, and a power loss can lose what the runner had
already committed).

Redelivery: the runner redelivers events whose offsets were not committed (after a crash
between the write and the commit). The sink remembers the ids of the last
``dedupe_window_events`` events it wrote (at start it reads them back from the end of the
newest segments) and skips those, so a redelivered batch is not appended twice.

A full disk (or any other OSError) never crashes the runner: the partial write is truncated
away, so the retried batch does not duplicate lines, and :class:`RetriableSinkError` makes the
runner pause and retry until space is back. A segment that cannot be gzipped for lack of space
stays uncompressed and is compressed at a later rotation.

Rotated segments are gzipped and pruned on a background thread (one per sink, so never two
at once), not inside the write that rotated; ``stop()`` waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import gzip
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import orjson
from auditpipe.schemas import Event, to_json_line
from pydantic import Field

from auditpipe.settings import StrictModel

from .base import Batch, RetriableSinkError, Sink

if TYPE_CHECKING:
    from auditpipe.privacy.erasure import EraseResult
    from auditpipe.privacy.selector import Selector

log = logging.getLogger("auditpipe.sinks.file")


class FileConfig(StrictModel):
    path: str = Field(description="the active JSONL file; rotated segments go beside it")
    max_bytes: int = Field(104_857_600, ge=1, description="rotate before exceeding this size")
    rotate_interval_secs: float | None = Field(
        None, gt=0, description="also rotate a segment this old (None: size only)"
    )
    backups: int = Field(10, ge=0, description="rotated segments kept (oldest deleted)")
    gzip: bool = True
    gzip_level: int = Field(
        3, ge=1, le=9, description="3 compresses chat text ~2x faster than 6, ~10% larger"
    )
    fsync: Literal["batch", "rotate", "never"] = "batch"
    dedupe_window_events: int = Field(
        100_000, ge=0, description="recently written event ids skipped on redelivery (0: off)"
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="records older than this are removed by `auditpipe retention --apply` "
        "(rotated segments rewritten or deleted); None keeps them (backups still prunes)",
    )
    encrypt_content: bool = Field(
        False,
        description="seal input/output per subject (AES-256-GCM, keys in [privacy] key_store) "
        "so that erasing a subject's keys shreds every copy (docs/privacy.md)",
    )


class FileSink(Sink[FileConfig]):
    """Appends each batch as JSON lines to ``path`` with one ``write`` and (by default) fsync."""

    name = "file"

    def __init__(self, config: FileConfig | None = None) -> None:
        super().__init__(config)
        self.path = Path(self.config.path)
        self._fd: int | None = None
        self._size = 0
        self._opened_at = 0.0
        self._seq = 0
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, None] = OrderedDict()
        # Rotated segments are gzipped and pruned by one background thread, so that a
        # rotation does not hold up the write that triggered it (gzip of a 100 MB segment of
        # chat text at level 6 takes seconds).
        self._housekeeper: concurrent.futures.ThreadPoolExecutor | None = None
        self._housekeeping_done: concurrent.futures.Future[None] | None = None
        # Seam for tests that cannot mount a small filesystem: os.write's signature.
        self.os_write: Callable[[int, bytes | memoryview], int] = os.write

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._open)
        if self.config.dedupe_window_events and not self._recent:
            await asyncio.to_thread(self._load_recent)

    async def write(self, batch: Batch) -> None:
        window = self.config.dedupe_window_events
        events: Sequence[Event] = batch
        if window:
            fresh, seen = [], set()
            for event in batch:
                eid = event["event_id"]
                if eid not in self._recent and eid not in seen:
                    fresh.append(event)
                    seen.add(eid)
            events = fresh
        if not events:
            return
        data = b"".join(map(to_json_line, events))
        await asyncio.to_thread(self._write_sync, data)
        if window:
            for event in events:
                self._recent[event["event_id"]] = None
            while len(self._recent) > window:
                self._recent.popitem(last=False)

    def _load_recent(self) -> None:
        """Read back the ids of the newest ``dedupe_window_events`` lines on disk."""
        window = self.config.dedupe_window_events
        ids: list[str] = []
        sources = [self.path, *reversed(self._segments())]
        for source in sources[:3]:
            try:
                if source.name.endswith(".gz"):
                    data = gzip.decompress(source.read_bytes())
                else:
                    with open(source, "rb") as fh:
                        size = fh.seek(0, os.SEEK_END)
                        fh.seek(max(0, size - 64 * 1024 * 1024))
                        data = fh.read()
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                log.warning("file sink: cannot read back %s: %s", source, exc)
                continue
            lines = data.split(b"\n")
            found = []
            for line in lines[-window - 1 :]:
                try:
                    found.append(orjson.loads(line)["event_id"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn or foreign line
            ids = found + ids
            if len(ids) >= window:
                break
        for eid in ids[-window:]:
            self._recent[eid] = None

    async def stop(self) -> None:
        await asyncio.to_thread(self._close)
        await asyncio.to_thread(self._finish_housekeeping)

    def _finish_housekeeping(self) -> None:
        housekeeper, self._housekeeper = self._housekeeper, None
        self._housekeeping_done = None
        if housekeeper is not None:
            housekeeper.shutdown(wait=True)

    # -----------------------------------------------------------------------------------------

    def _open(self) -> None:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._size = os.fstat(self._fd).st_size
                self._opened_at = time.monotonic()

    def _close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    if self.config.fsync != "never":
                        os.fsync(fd)
                finally:
                    os.close(fd)

    def _write_sync(self, data: bytes) -> None:
        try:
            if self._fd is None:
                self._open()
            with self._lock:
                # a rotation waits for the previous housekeeping, which takes the erase lock:
                # wait before taking it
                if self._housekeeping_done is not None and self._due(len(data)):
                    self._housekeeping_done.result()
                with self.erase_lock():
                    self._follow_swap()
                    if self._due(len(data)):
                        self._rotate()
                    self._append(data)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            what = "disk full" if full else "write failed"
            raise RetriableSinkError(f"file sink: {what} at {self.path}: {exc}") from exc

    def _due(self, incoming: int) -> bool:
        if self._size == 0:
            return False
        if self._size + incoming > self.config.max_bytes:
            return True
        interval = self.config.rotate_interval_secs
        return interval is not None and time.monotonic() - self._opened_at >= interval

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        fd, start = self._fd, self._size
        view = memoryview(data)
        try:
            while view:
                view = view[self.os_write(fd, view) :]
            if self.config.fsync == "batch":
                os.fsync(fd)
        except OSError:
            try:  # drop the partial batch: the retry rewrites all of it
                os.ftruncate(fd, start)
            except OSError as exc:
                log.error("file sink: cannot truncate %s after a failed write: %s", self.path, exc)
            raise
        self._size = start + len(data)

    def _rotate(self) -> None:
        assert self._fd is not None
        if self.config.fsync != "never":
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        rotated = self._rotated_name()
        os.replace(self.path, rotated)
        self._fsync_dir()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = 0
        self._opened_at = time.monotonic()
        if self._housekeeper is None:
            self._housekeeper = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="auditpipe-file-gzip"
            )
        # At most one rotation's housekeeping runs behind the writes: if the previous one is
        # still going, this write waits for it (disk use stays bounded; gzip keeps up).
        if self._housekeeping_done is not None:
            self._housekeeping_done.result()
        self._housekeeping_done = self._housekeeper.submit(self._housekeeping)

    def _housekeeping(self) -> None:
        """Gzip the rotated segments that are not yet (also earlier failures), then prune.

        Runs on the single housekeeping thread only, so compression and pruning never race
        each other; the writer only ever adds plain segments (by renaming the active file).
        """
        try:
            with self.erase_lock():
                if self.config.gzip:
                    for segment in self._segments():
                        if not segment.name.endswith(".gz"):
                            self._compress(segment)
                self._prune()
        except Exception as exc:  # never lose the thread's work silently
            log.warning("file sink: housekeeping of %s failed: %s", self.path, exc)

    def _rotated_name(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:
            self._seq += 1
            candidate = self.path.with_name(
                f"{self.path.stem}.{stamp}-{self._seq}{self.path.suffix}"
            )
            if not candidate.exists() and not Path(f"{candidate}.gz").exists():
                return candidate

    def _segments(self) -> list[Path]:
        """Rotated segments, oldest first (names sort by time, then sequence)."""
        prefix, suffix = f"{self.path.stem}.", self.path.suffix
        found = []
        for p in self.path.parent.iterdir():
            name = p.name.removesuffix(".gz")
            if p != self.path and name.startswith(prefix) and name.endswith(suffix):
                middle = name[len(prefix) : len(name) - len(suffix)]
                stamp, _, seq = middle.partition("-")
                if len(stamp) == 16 and stamp.endswith("Z") and seq.isdigit():
                    found.append((stamp, int(seq), p))
        return [p for _, _, p in sorted(found)]

    def _compress(self, segment: Path) -> None:
        target = Path(f"{segment}.gz")
        tmp = Path(f"{segment}.gz.tmp")
        try:
            with open(segment, "rb") as src, open(tmp, "wb") as raw:
                with gzip.GzipFile(
                    filename=segment.name, mode="wb", fileobj=raw,
                    compresslevel=self.config.gzip_level,
                ) as gz:  # fmt: skip
                    shutil.copyfileobj(src, gz, 1 << 20)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, target)
            self._fsync_dir()
            segment.unlink()
        except OSError as exc:  # e.g. no space: keep the plain segment, try again later
            tmp.unlink(missing_ok=True)
            log.warning("file sink: could not gzip %s (%s); kept uncompressed", segment, exc)

    def _prune(self) -> None:
        segments = self._segments()
        excess = len(segments) - self.config.backups
        for old in segments[: max(0, excess)]:
            old.unlink(missing_ok=True)

    def _fsync_dir(self) -> None:
        if self.config.fsync == "never":
            return
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- erasure (auditpipe.privacy.erasure.Erasable) -----------------------------------------
    #
    # A file that holds selected lines is rewritten without them: the kept lines byte for
    # byte (gzip again for .gz segments) into ``NAME.erase-tmp``, fsynced, renamed over the
    # original and the directory fsynced, so a crash leaves either the old or the new file,
    # never a half. The whole pass holds a flock on the directory, which the writer and the
    # housekeeping thread also take: no batch is appended to, and no segment gzipped from, a
    # file being rewritten. The writer notices that the active file was swapped (another
    # inode at ``path``) and reopens it.

    @contextlib.contextmanager
    def erase_lock(self) -> Iterator[None]:
        # flock on the directory itself: no lock file beside the segments
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _follow_swap(self) -> None:
        if self._fd is None:
            return
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = None
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size

    def data_files(self) -> list[Path]:
        """Every file holding records: rotated segments (oldest first), then the active one."""
        if not self.path.parent.exists():
            return []
        files = self._segments()
        if self.path.exists():
            files.append(self.path)
        return files

    @staticmethod
    def _read_lines(path: Path) -> list[bytes]:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        return lines

    @staticmethod
    def _selected(line: bytes, selector: Selector) -> bool:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False  # a torn line: no record to match, kept as it is
        return isinstance(event, dict) and selector.matches(event)

    async def count(self, selector: Selector) -> int:
        def run() -> int:
            with self.erase_lock():
                return sum(
                    self._selected(line, selector)
                    for f in self.data_files()
                    for line in self._read_lines(f)
                )

        return await asyncio.to_thread(run)

    async def erase(self, selector: Selector) -> EraseResult:
        return await asyncio.to_thread(self._erase_sync, selector)

    def _erase_sync(self, selector: Selector) -> EraseResult:
        from auditpipe.privacy.erasure import EraseResult

        result = EraseResult()
        with self.erase_lock():
            for stale in self.path.parent.glob(f"{self.path.stem}*.erase-tmp"):
                stale.unlink(missing_ok=True)  # left by an interrupted erasure
            for f in self.data_files():
                lines = self._read_lines(f)
                kept = [line for line in lines if not self._selected(line, selector)]
                if len(kept) == len(lines):
                    continue
                self._replace(f, b"".join(line + b"\n" for line in kept))
                result.erased += len(lines) - len(kept)
        return result

    def _replace(self, target: Path, data: bytes) -> None:
        tmp = target.with_name(target.name + ".erase-tmp")
        with open(tmp, "wb") as raw:
            if target.name.endswith(".gz"):
                with gzip.GzipFile(
                    filename=target.name.removesuffix(".gz"), mode="wb", fileobj=raw,
                    compresslevel=self.config.gzip_level,
                ) as gz:  # fmt: skip
                    gz.write(data)
            else:
                raw.write(data)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, target.stat().st_mode & 0o777)
        os.replace(tmp, target)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
