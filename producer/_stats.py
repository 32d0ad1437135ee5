"""The producer's counters."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

#: Upper bounds (seconds) of the send-latency histogram buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ProducerStats:
    emitted: int = 0
    sent: int = 0
    failed: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe_latency(self, secs: float, count: int = 1) -> None:
        i = 0
        for i, bound in enumerate(LATENCY_BUCKETS):  # noqa: B007
            if secs <= bound:
                break
        else:
            i = len(LATENCY_BUCKETS)
        self.latency_buckets[i] += count
        self.latency_sum += secs * count
