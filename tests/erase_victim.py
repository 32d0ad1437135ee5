"""An erasure that stops mid-way, for the kill -9 tests: ``python -m tests.erase_victim STORE
CONFIG MARKER``. It runs ``auditpipe erase --user alice --yes`` over the store configured in
CONFIG and, at a point where the store is half done, touches MARKER and blocks until killed:

- file: the second file's rewrite is written to its temp file, not yet renamed over it;
- postgres: the first chunk (3 records) is committed, the second deleted but not committed;
- s3: two objects are rewritten, the third's rewrite is blocked.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any


def block(marker: str) -> None:
    Path(marker).touch()
    while True:
        time.sleep(3600)


def main() -> None:
    store, config, marker = sys.argv[1:4]
    if store == "file":
        from auditpipe.sinks.file import FileSink

        original = FileSink._replace
        calls = [0]

        def replace(self: FileSink, target: Path, data: bytes) -> None:
            calls[0] += 1
            if calls[0] == 2:
                tmp = target.with_name(target.name + ".erase-tmp")
                tmp.write_bytes(data[: len(data) // 2])
                block(marker)
            original(self, target, data)

        FileSink._replace = replace  # type: ignore[method-assign]
    elif store == "postgres":
        from auditpipe.sinks.postgres import PostgresSink

        PostgresSink.erase_chunk_rows = 3
        connect = PostgresSink._erase_connection

        async def erase_connection(self: PostgresSink) -> Any:
            conn = await connect(self)
            execute = conn.execute
            deletes = [0]

            async def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
                result = await execute(sql, *args, **kwargs)
                if sql.lstrip().startswith("DELETE FROM") and ".requests" in sql.split("\n")[0]:
                    deletes[0] += 1
                    if deletes[0] == 2:  # inside the second chunk's transaction
                        block(marker)
                return result

            conn.execute = counting
            return conn

        PostgresSink._erase_connection = erase_connection  # type: ignore[method-assign]
    elif store == "s3":
        from auditpipe.sinks.s3 import S3Sink

        original_object = S3Sink._erase_object
        lock, done = threading.Lock(), [0]

        def erase_object(self: S3Sink, key: str, selector: Any) -> Any:
            result = original_object(self, key, selector) if _has(self, key, selector) else None
            if result is None:
                return 0, None, 0
            with lock:
                done[0] += 1
                if done[0] >= 2:
                    block(marker)
            return result

        def _has(self: S3Sink, key: str, selector: Any) -> bool:
            return self._scan(key, selector) > 0

        S3Sink._erase_object = erase_object  # type: ignore[method-assign]
    from auditpipe.cli import main as cli

    sys.exit(cli(["erase", "--config", config, "--user", "alice", "--yes"]))


if __name__ == "__main__":
    main()
