"""The disk spool: where encoded events wait while Kafka is unreachable or slower than traffic.

Layout: a directory of segment files ``000000000001.seg``, ``000000000002.seg``, ... written
in order, plus ``<segment>.ack`` holding how far the oldest segment was replayed (so a restart
does not resend what Kafka already acknowledged), and ``.lock`` (one process per spool).

Record framing (big-endian)::

    bytes 0-1   magic b"AP"
    bytes 2-5   payload length
    bytes 6-9   CRC-32 of the payload
    bytes 10-   payload (the Confluent-framed Avro value)

Contract: only the producer's sender thread uses a Spool (no locking inside). ``append()``
buffers; ``flush()`` writes the buffer with one ``write`` call and reports records it could not
keep (``spool_full``, ``disk_full``, ``spool_error``); nothing here raises into the caller after
``open()``. Reading (``read_batch``) returns records in append order; ``commit()`` makes a read
durable (deletes finished segments, moves the ack offset), ``rewind()`` forgets an uncommitted
read. Corrupt bytes (bad magic, length or checksum, a torn tail after a crash) are skipped,
resynchronising on the next valid record, and counted in ``corrupt_records`` /
``corrupt_bytes``; they are never fatal. A process restart always writes to a new segment, so
a torn tail stays where the reader expects it. Records are flushed to the OS (they survive a
process crash, not a power cut: there is no fsync per batch).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAGIC = b"AP"
_HEADER = struct.Struct(">2sII")
_SUFFIX = ".seg"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

WriteFn = Callable[[int, bytes], int]


class SpoolError(Exception):
    """The spool directory cannot be used (not creatable, or locked by another process)."""


@dataclass
class ReadToken:
    """Where a read_batch ended; pass it to commit()."""

    segment: int
    offset: int


class Spool:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        segment_bytes: int,
        *,
        write_fn: WriteFn = os.write,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._write = write_fn
        self._lock_fd: int | None = None
        self._segments: dict[int, int] = {}  # segment number -> size on disk
        self._writer_fd: int | None = None
        self._writer_seg = 0
        self._pending = bytearray()
        self._pending_count = 0
        self._read_seg = 0  # committed position
        self._read_off = 0
        self._cur_seg = 0  # uncommitted position (after read_batch)
        self._cur_off = 0
        self.corrupt_records = 0
        self.corrupt_bytes = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> Spool:
        """Create/lock the directory and find what an earlier process left. Raises SpoolError."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"producer.spool_dir {self.directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"producer.spool_dir {self.directory} is in use by another process; "
                "give each producer process a spool_dir of its own"
            ) from None
        self._lock_fd = fd
        for path in self.directory.glob(f"*{_SUFFIX}"):
            try:
                self._segments[int(path.stem)] = path.stat().st_size
            except (ValueError, OSError):
                continue
        if self._segments:
            head = min(self._segments)
            self._read_seg = self._cur_seg = head
            self._read_off = self._cur_off = self._load_ack(head)
            self._writer_seg = max(self._segments)
        return self

    def close(self) -> None:
        self.flush()
        if self._writer_fd is not None:
            os.close(self._writer_fd)
            self._writer_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return sum(self._segments.values()) + len(self._pending)

    @property
    def empty(self) -> bool:
        """True when nothing is left to replay (committed position is at the end)."""
        if self._pending:
            return False
        for seg, size in self._segments.items():
            if seg > self._read_seg or (seg == self._read_seg and size > self._read_off):
                return False
        return True

    # -- writing -------------------------------------------------------------------------------

    def append(self, payload: bytes) -> str | None:
        """Buffer one record. Returns None, or the drop reason when it cannot be kept."""
        need = _HEADER.size + len(payload)
        if self.size_bytes + need > self.max_bytes:
            return "spool_full"
        self._pending += _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload))
        self._pending += payload
        self._pending_count += 1
        return None

    def flush(self) -> tuple[int, str | None]:
        """Write buffered records. Returns (records dropped, reason) for records not kept."""
        if not self._pending:
            return 0, None
        data, count = bytes(self._pending), self._pending_count
        self._pending.clear()
        self._pending_count = 0
        try:
            fd = self._writer()
            start = self._segments[self._writer_seg]
            try:
                view = memoryview(data)
                while view:
                    n = self._write(fd, view.tobytes() if len(view) != len(data) else data)
                    view = view[n:]
            except OSError:
                try:  # do not leave a torn record in front of later appends
                    os.ftruncate(fd, start)
                except OSError:
                    self._rotate()
                raise
            self._segments[self._writer_seg] = start + len(data)
            if start + len(data) >= self.segment_bytes:
                self._rotate()
        except OSError as exc:
            reason = "disk_full" if exc.errno in _NO_SPACE else "spool_error"
            return count, reason
        return 0, None

    def _writer(self) -> int:
        if self._writer_fd is None:
            self._writer_seg = max(self._segments, default=0) + 1
            path = self.directory / f"{self._writer_seg:012d}{_SUFFIX}"
            self._writer_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._segments[self._writer_seg] = 0
            if len(self._segments) == 1:
                self._read_seg = self._cur_seg = self._writer_seg
                self._read_off = self._cur_off = 0
        return self._writer_fd

    def _rotate(self) -> None:
        if self._writer_fd is not None:
            os.close(self._writer_fd)
            self._writer_fd = None

    # -- reading -------------------------------------------------------------------------------

    def read_batch(
        self, max_records: int, max_bytes: int = 4 << 20
    ) -> tuple[list[bytes], ReadToken]:
        """Up to ``max_records`` records after the last read, in order (flushes first)."""
        self.flush()
        out: list[bytes] = []
        size = 0
        seg, off = self._cur_seg, self._cur_off
        while len(out) < max_records and size < max_bytes and seg in self._segments:
            end = self._segments[seg]
            if off >= end:
                nxt = [s for s in self._segments if s > seg]
                if not nxt:
                    break
                seg, off = min(nxt), 0
                continue
            want = min(end - off, max(max_bytes - size, 1 << 16))
            data = self._read(seg, off, want)
            if not data:  # vanished or unreadable: skip the rest of the segment
                self.corrupt_bytes += end - off
                off = end
                continue
            pos = 0
            while pos < len(data) and len(out) < max_records:
                rec = _parse(data, pos)
                if rec is None:  # the record runs past this chunk
                    if off + len(data) >= end:  # torn tail: nothing more will come
                        self.corrupt_records += 1
                        self.corrupt_bytes += len(data) - pos
                        pos = len(data)
                    elif pos == 0:  # one record larger than the chunk: read all of it
                        _, length, _ = _HEADER.unpack_from(data, 0)
                        data = self._read(seg, off, min(end - off, _HEADER.size + length))
                        continue
                    break
                if rec is False:
                    nxt_pos = _resync(data, pos + 1)
                    self.corrupt_records += 1
                    self.corrupt_bytes += nxt_pos - pos
                    pos = nxt_pos
                    continue
                payload, pos = rec
                out.append(payload)
                size += len(payload)
            off += pos
        self._cur_seg, self._cur_off = seg, off
        return out, ReadToken(seg, off)

    def _read(self, seg: int, off: int, size: int) -> bytes:
        try:
            with open(self.directory / f"{seg:012d}{_SUFFIX}", "rb") as fh:
                fh.seek(off)
                return fh.read(size)
        except OSError:
            return b""

    def rewind(self) -> None:
        self._cur_seg, self._cur_off = self._read_seg, self._read_off

    def commit(self, token: ReadToken) -> None:
        """Everything read up to ``token`` is delivered: free it and remember the position."""
        for seg in sorted(self._segments):
            if seg >= token.segment:
                break
            self._drop_segment(seg)
        self._read_seg, self._read_off = token.segment, token.offset
        end = self._segments.get(token.segment)
        if end is not None and token.offset >= end and not self._pending:
            # fully replayed: retire it (a new writer segment starts on the next append)
            if token.segment == self._writer_seg:
                self._rotate()
            self._drop_segment(token.segment)
            self._read_off = self._cur_off = 0
            later = [s for s in self._segments if s > token.segment]
            self._read_seg = self._cur_seg = min(later) if later else 0
        else:
            self._save_ack(token.segment, token.offset)

    def _drop_segment(self, seg: int) -> None:
        self._segments.pop(seg, None)
        for suffix in (_SUFFIX, ".ack"):
            try:
                os.unlink(self.directory / f"{seg:012d}{suffix}")
            except OSError:
                pass

    def _save_ack(self, seg: int, offset: int) -> None:
        try:
            (self.directory / f"{seg:012d}.ack").write_text(str(offset))
        except OSError:
            pass  # a lost ack only means duplicates after a restart (deduped by event_id)

    def _load_ack(self, seg: int) -> int:
        try:
            value = int((self.directory / f"{seg:012d}.ack").read_text())
        except (OSError, ValueError):
            return 0
        return value if 0 <= value <= self._segments.get(seg, 0) else 0


def _parse(data: bytes, pos: int) -> tuple[bytes, int] | Literal[False] | None:
    """(payload, next_pos); None when the record runs past ``data``; False when invalid."""
    if len(data) - pos < _HEADER.size:
        return None if MAGIC.startswith(data[pos : pos + 2]) else False
    magic, length, crc = _HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return False
    start = pos + _HEADER.size
    if start + length > len(data):
        return None
    payload = data[start : start + length]
    if zlib.crc32(payload) != crc:
        return False
    return payload, start + length


def _resync(data: bytes, pos: int) -> int:
    """Position of the next record that parses (or a plausible partial one) at/after ``pos``."""
    while True:
        pos = data.find(MAGIC, pos)
        if pos < 0:
            return len(data)
        if _parse(data, pos) is not False:
            return pos
        pos += 1
