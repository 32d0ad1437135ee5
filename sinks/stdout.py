"""stdout: one JSON line per event (the JSON rendering), for people and log shippers."""

from __future__ import annotations

import sys
from typing import BinaryIO

from auditpipe.schemas import to_json_line

from auditpipe.settings import StrictModel

from .base import Batch, RetriableSinkError, Sink


class StdoutConfig(StrictModel):
    pass


class StdoutSink(Sink[StdoutConfig]):
    """Writes each batch to standard output and flushes before ``write`` returns."""

    name = "stdout"

    def __init__(self, config: StdoutConfig | None = None, stream: BinaryIO | None = None) -> None:
        super().__init__(config)
        self._stream = stream

    async def write(self, batch: Batch) -> None:
        stream = self._stream or sys.stdout.buffer
        data = b"".join(map(to_json_line, batch))
        try:
            stream.write(data)
            stream.flush()
        except OSError as exc:  # EPIPE, ENOSPC on a redirected stdout...
            raise RetriableSinkError(f"stdout write failed: {exc}") from exc
