"""The file sink on real disks: rotation, gzip, backups, fsync modes, and a full disk.

The full-disk test mounts a 1 MiB tmpfs (the tests run as root here and in CI); where mounting
is not permitted it fills the disk through the sink's ``os_write`` seam instead (ENOSPC after a
byte budget), and says so in the failure output if that path breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditpipe.sinks import Batch
from auditpipe.sinks.file import FileSink
from auditpipe.sinks.runner import SinkRunner

from auditpipe.errors import ConfigError
from auditpipe.settings import Settings

from .sinkutil import committed, fast, make_events, produce_events, wait_for, write_batches


def sink_at(path: Path, **config: Any) -> FileSink:
    sink = FileSink.from_mapping({"path": str(path), **config})
    assert isinstance(sink, FileSink)
    return sink


def read_all(directory: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(directory.iterdir()):
        data = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        out += [orjson.loads(x) for x in data.splitlines()]
    return out


class TestRotation:
    def test_size_rotation_gzips_segments_and_keeps_n_backups(self, tmp_path: Path) -> None:
        """Past max_bytes the file rotates; old segments are gzipped; only `backups` remain."""
        path = tmp_path / "events.jsonl"
        evs = make_events(40)
        sink = sink_at(path, max_bytes=5000, backups=3)
        asyncio.run(write_batches(sink, *[evs[i : i + 2] for i in range(0, 40, 2)]))
        rotated = sorted(p.name for p in tmp_path.iterdir() if p != path)
        assert len(rotated) == 3 and all(n.endswith(".jsonl.gz") for n in rotated), rotated
        assert all(n.startswith("events.") for n in rotated)
        kept = read_all(tmp_path)
        ids = [e["event_id"] for e in kept]
        assert len(ids) == len(set(ids)), "no event twice"
        # the newest events survive pruning, in order
        assert ids == [e["event_id"] for e in evs][-len(ids) :]
        for p in tmp_path.iterdir():
            assert p.stat().st_size <= 5000 or p == path

    def test_a_batch_is_never_split_across_segments(self, tmp_path: Path) -> None:
        """Each segment holds whole batches (rotation happens between writes)."""
        path = tmp_path / "events.jsonl"
        evs = make_events(12)
        sink = sink_at(path, max_bytes=7000, gzip=False, backups=100)
        asyncio.run(write_batches(sink, *[evs[i : i + 3] for i in range(0, 12, 3)]))
        for p in tmp_path.iterdir():
            assert len(p.read_bytes().splitlines()) % 3 == 0

    def test_time_rotation(self, tmp_path: Path) -> None:
        """A segment older than rotate_interval_secs is rotated at the next write."""
        path = tmp_path / "events.jsonl"
        sink = sink_at(path, rotate_interval_secs=0.2, gzip=False)

        async def scenario() -> None:
            await sink.start()
            await sink.write(make_events(1))
            await sink.write(make_events(1))
            assert len(os.listdir(tmp_path)) == 1
            await asyncio.sleep(0.3)  # the 0.2 s interval must really elapse
            await sink.write(make_events(1))
            await sink.stop()

        asyncio.run(scenario())
        names = sorted(p.name for p in tmp_path.iterdir())
        assert len(names) == 2 and "events.jsonl" in names
        assert len(read_all(tmp_path)) == 3

    @pytest.mark.parametrize("fsync", ["batch", "rotate", "never"])
    def test_every_fsync_mode_writes_everything(self, tmp_path: Path, fsync: str) -> None:
        evs = make_events(10)
        path = tmp_path / "e.jsonl"
        asyncio.run(write_batches(sink_at(path, fsync=fsync, max_bytes=6000), evs[:5], evs[5:]))
        assert [e["event_id"] for e in read_all(tmp_path)] == [e["event_id"] for e in evs]

    def test_restart_skips_events_already_on_disk(self, tmp_path: Path) -> None:
        """A new sink (after a crash) reads back recent ids and skips a redelivered batch."""
        path = tmp_path / "events.jsonl"
        evs = make_events(10)
        asyncio.run(write_batches(sink_at(path), evs))
        asyncio.run(write_batches(sink_at(path), evs[5:], make_events(2)))
        assert len(read_all(tmp_path)) == 12

    def test_bad_config_names_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"sinks\.file\.fsync"):
            FileSink.from_mapping({"path": "x", "fsync": "sometimes"})
        with pytest.raises(ConfigError, match=r"sinks\.file\.path"):
            FileSink.from_mapping({})


@contextlib.contextmanager
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """A 1 MiB tmpfs at a temp dir; yields (dir, grow) where grow() makes it 64 MiB."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if out.returncode != 0:
        yield mnt, None
        return

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)

    try:
        yield mnt, grow
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class TestFullDisk:
    def test_full_disk_pauses_without_loss_and_resumes(
        self, tmp_path: Path, settings: Settings
    ) -> None:
        """ENOSPC -> retriable: no crash, no partial lines; after space returns all arrive once."""
        evs = make_events(800)  # ~1.6 MB of JSON for a 1 MiB disk
        with small_disk(tmp_path) as (mnt, grow):
            sink = sink_at(mnt / "events.jsonl", gzip=False)
            budget = {"left": 1_000_000}
            if grow is None:  # no mount permission: simulate the disk through the seam
                real = os.write

                def limited(fd: int, data: Any) -> int:
                    if budget["left"] <= 0:
                        raise OSError(errno.ENOSPC, "No space left on device (simulated)")
                    n = real(fd, bytes(data[: budget["left"]]))
                    budget["left"] -= n
                    return n

                sink.os_write = limited

                def grow() -> None:
                    budget["left"] = 1 << 40

            s = fast(settings, max_events=100, backoff_initial_secs=0.05, backoff_max_secs=0.2)

            async def scenario() -> SinkRunner:
                await produce_events(s, evs)
                runner = SinkRunner(sink, s)
                task = asyncio.create_task(runner.run())
                try:
                    await wait_for(
                        lambda: runner.stats.errors.get("RetriableSinkError", 0) >= 2,
                        60, "the disk to fill up",
                    )  # fmt: skip
                    assert runner.snapshot()["paused"], "the failing partition is paused"
                    assert not task.done(), "a full disk must not stop the runner"
                    lines = (mnt / "events.jsonl").read_bytes()
                    assert lines.endswith(b"\n"), "no partial line left behind"
                    grow()
                    await wait_for(lambda: runner.stats.written >= len(evs), 60, "all written")
                    assert not runner.snapshot()["paused"]
                finally:
                    runner.stop()
                    await asyncio.wait_for(task, 30)
                assert await committed(s, runner.group_id) == len(evs)
                return runner

            asyncio.run(scenario())
            ids = [e["event_id"] for e in read_all(mnt)]
        assert len(ids) == len(evs) and set(ids) == {e["event_id"] for e in evs}


def test_batch_object_from_runner_carries_its_source() -> None:
    """Batch keeps topic/partition/offsets, and slices keep them aligned."""
    evs = make_events(4)
    b = Batch(evs, "t", 1, [10, 11, 12, 13])
    half = b.slice(2, 4)
    assert (half.topic, half.partition, half.offsets, half.first_offset) == ("t", 1, [12, 13], 12)
    assert list(half) == evs[2:]
