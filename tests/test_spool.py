"""The disk spool on a real file system: order, segments, restart, corruption, limits."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from auditpipe.producer import Spool, SpoolError


def records(n: int, size: int = 100) -> list[bytes]:
    return [f"{i:06d}".encode() + b"x" * (size - 6) for i in range(n)]


def drain(spool: Spool) -> list[bytes]:
    out: list[bytes] = []
    while True:
        batch, token = spool.read_batch(7)
        spool.commit(token)
        if not batch:
            return out
        out.extend(batch)


class TestSpool:
    def test_records_come_back_in_order_across_segments(self, tmp_path: Path) -> None:
        """Many small segments; replay returns every record once, in order; files are freed."""
        spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1024).open()
        data = records(100)
        for i, rec in enumerate(data):
            assert spool.append(rec) is None
            if i % 5 == 4:
                assert spool.flush() == (0, None)
        assert len(list(tmp_path.glob("*.seg"))) > 5
        assert drain(spool) == data and spool.empty
        assert list(tmp_path.glob("*.seg")) == []
        spool.close()

    def test_uncommitted_reads_are_read_again(self, tmp_path: Path) -> None:
        """rewind() forgets a read that Kafka did not acknowledge."""
        spool = Spool(tmp_path, 1 << 20, 4096).open()
        for rec in records(10):
            spool.append(rec)
        first, _ = spool.read_batch(4)
        spool.rewind()
        again, token = spool.read_batch(4)
        assert first == again == records(10)[:4]
        spool.commit(token)
        assert drain(spool) == records(10)[4:]
        spool.close()

    def test_a_restart_resumes_after_the_last_commit(self, tmp_path: Path) -> None:
        """A new process finds the segments and the ack offset and resumes; writes go to a new
        segment."""
        spool = Spool(tmp_path, 1 << 20, 1 << 20).open()
        for rec in records(20):
            spool.append(rec)
        _, token = spool.read_batch(8)
        spool.commit(token)
        spool.close()
        again = Spool(tmp_path, 1 << 20, 1 << 20).open()
        assert not again.empty
        again.append(b"after-restart")
        assert drain(again) == [*records(20)[8:], b"after-restart"]
        again.close()

    def test_corrupt_records_and_torn_tail_are_skipped_and_counted(self, tmp_path: Path) -> None:
        """A flipped byte in one record and a torn last record: the others still replay."""
        spool = Spool(tmp_path, 1 << 20, 1 << 20).open()
        data = records(10)
        for rec in data:
            spool.append(rec)
        spool.close()
        (segment,) = tmp_path.glob("*.seg")
        raw = bytearray(segment.read_bytes())
        raw[3 * 110 + 50] ^= 0xFF  # inside record 3's payload (10-byte header + 100)
        segment.write_bytes(bytes(raw[:-30]))  # tear record 9
        again = Spool(tmp_path, 1 << 20, 1 << 20).open()
        got = drain(again)
        assert got == [r for i, r in enumerate(data) if i not in (3, 9)]
        assert again.corrupt_records == 2 and again.corrupt_bytes > 0
        again.close()

    def test_garbage_between_records_resynchronises(self, tmp_path: Path) -> None:
        """Random bytes inserted between records are skipped up to the next valid record."""
        spool = Spool(tmp_path, 1 << 20, 1 << 20).open()
        spool.append(b"one")
        spool.flush()
        (segment,) = tmp_path.glob("*.seg")
        with open(segment, "ab") as fh:
            fh.write(b"\x00garbage\xffAPnot-a-record")
        spool.close()
        again = Spool(tmp_path, 1 << 20, 1 << 20).open()
        again.append(b"two")
        assert drain(again) == [b"one", b"two"]
        assert again.corrupt_records >= 1
        again.close()

    def test_limit_reached_drops_with_a_reason(self, tmp_path: Path) -> None:
        """Beyond spool_max_bytes append() refuses with "spool_full"; nothing is written."""
        spool = Spool(tmp_path, max_bytes=1100, segment_bytes=4096).open()
        results = [spool.append(rec) for rec in records(20)]
        assert results.count(None) == 10 and results.count("spool_full") == 10
        assert spool.size_bytes <= 1100
        spool.close()

    def test_disk_full_drops_with_a_reason(self, tmp_path: Path) -> None:
        """ENOSPC from write: the batch is reported as disk_full and the file is not torn.

        Uses an injected writer that raises ENOSPC after a byte budget (a real tmpfs ENOSPC is
        exercised in test_producer_faults.py)."""
        budget = [500]

        def write(fd: int, data: bytes) -> int:
            if len(data) > budget[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= len(data)
            return os.write(fd, data)

        spool = Spool(tmp_path, 1 << 20, 1 << 20, write_fn=write).open()
        for rec in records(4):
            spool.append(rec)
        assert spool.flush() == (0, None)
        for rec in records(4):
            spool.append(rec)
        assert spool.flush() == (4, "disk_full")
        assert drain(spool) == records(4) and spool.corrupt_records == 0
        spool.close()

    def test_one_process_per_spool(self, tmp_path: Path) -> None:
        """A second open of the same directory fails with an error naming the setting."""
        first = Spool(tmp_path, 1 << 20, 1 << 20).open()
        with pytest.raises(SpoolError, match=r"producer\.spool_dir"):
            Spool(tmp_path, 1 << 20, 1 << 20).open()
        first.close()
        Spool(tmp_path, 1 << 20, 1 << 20).open().close()
