"""Run the configured processor chain over a JSONL file of audit records (``auditpipe redact``).

One line in, one line out (unless the sample step drops it), in the same JSON rendering. Lines
that are not audit records, and records a step fails on, go to the rejects stream as
``{"line": N, "error": "...", "text": "<original line>"}`` and never to the output: redaction
fails closed here too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO

import orjson
from auditpipe.schemas import DecodeError, from_json, to_json_line

from .steps import Step


@dataclass
class OfflineReport:
    lines: int = 0
    written: int = 0
    dropped: int = 0
    rejected: int = 0

    def summary(self) -> str:
        return (
            f"{self.lines} line(s): {self.written} written, {self.dropped} sampled out, "
            f"{self.rejected} rejected"
        )


def run_offline(
    chain: Sequence[Step],
    lines: Iterable[bytes],
    out: IO[bytes],
    rejects: IO[bytes],
    progress: IO[str] | None = sys.stderr,
    progress_every_secs: float = 2.0,
) -> OfflineReport:
    report = OfflineReport()
    last = time.monotonic()
    for number, raw in enumerate(lines, start=1):
        report.lines += 1
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            report.lines -= 1
            continue
        try:
            event = from_json(line)
            for step in chain:
                result = step(event)
                if result is None:
                    break
                event = result
            else:
                out.write(to_json_line(event))
                report.written += 1
                continue
            report.dropped += 1
        except DecodeError as exc:
            _reject(rejects, number, f"not an audit record: {exc}", line)
            report.rejected += 1
        except Exception as exc:  # a step failed: fail closed, never write the record
            name = getattr(step, "__name__", type(step).__name__)
            _reject(rejects, number, f"step {name} failed: {type(exc).__name__}: {exc}", line)
            report.rejected += 1
        if progress is not None and time.monotonic() - last >= progress_every_secs:
            print(f"[auditpipe redact] {report.summary()}", file=progress, flush=True)
            last = time.monotonic()
    out.flush()
    rejects.flush()
    return report


def _reject(stream: IO[bytes], number: int, error: str, line: bytes) -> None:
    text = line.decode("utf-8", "replace")
    stream.write(orjson.dumps({"line": number, "error": error, "text": text}) + b"\n")
