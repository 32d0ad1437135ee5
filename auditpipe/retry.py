"""Retry with backoff: one helper for the producer, the processors and the sink runner.

:class:`Backoff` gives the delays (exponential, capped, jittered so that many clients do not
retry in step); :func:`is_permanent` tells whether retrying can help, from the exception's own
flag: ``permanent`` (auditpipe's errors), otherwise ``retriable`` (aiokafka's broker errors say
whether the broker may accept the same request later). Anything that does not say is treated
as retriable: a store or broker that is away must never turn records into dead letters.

Stdlib only: the producer imports it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff", "is_permanent"]


class Backoff:
    """Delays of ``initial``, then times ``factor`` each failure up to ``cap``, each jittered by
    plus or minus ``jitter`` (0.5: between half and one and a half times the nominal delay).

    ``next()`` returns the delay before the next attempt and counts a failure; ``reset()``
    after a success starts again at ``initial``.
    """

    __slots__ = ("_random", "cap", "factor", "failures", "initial", "jitter", "nominal")

    def __init__(
        self,
        initial: float = 0.1,
        cap: float = 5.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or cap < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError(
                f"Backoff needs 0 < initial <= cap, factor >= 1, 0 <= jitter < 1 "
                f"(got initial={initial}, cap={cap}, factor={factor}, jitter={jitter})"
            )
        self.initial, self.cap, self.factor, self.jitter = initial, cap, factor, jitter
        self.failures = 0
        self.nominal = 0.0  # the delay before jitter, 0 until the first failure
        self._random = rng

    def next(self) -> float:
        self.nominal = (
            self.initial if self.failures == 0 else min(self.nominal * self.factor, self.cap)
        )
        self.failures += 1
        return self.nominal * (1 - self.jitter + 2 * self.jitter * self._random())

    def reset(self) -> None:
        self.failures = 0
        self.nominal = 0.0


def is_permanent(exc: BaseException) -> bool:
    """True when retrying the same thing cannot succeed, by the exception's own flag; an
    exception that does not say is judged by the one it wraps (Faust wraps aiokafka's errors in
    ``ProducerSendError``)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        permanent = getattr(current, "permanent", None)
        if permanent is not None:
            return bool(permanent)
        if hasattr(current, "retriable"):
            # aiokafka: BrokerResponseError subclasses carry the broker's verdict. Its
            # client-side KafkaTimeoutError also says retriable = False, but a timeout is the
            # broker being away.
            return current.retriable is False and type(current).__name__ not in _TRANSIENT
        current, seen = current.__cause__, seen + 1
    return False


# aiokafka errors flagged not retriable that mean "not now" rather than "never".
# The producer's own state (fencing, sequence numbers) is fixed by a new producer, not by
# giving the record up.
_TRANSIENT = frozenset(
    {
        "KafkaTimeoutError", "ProducerClosed", "IllegalStateError", "UnknownError", "KafkaError",
        "ProducerFenced", "OutOfOrderSequenceNumber", "DuplicateSequenceNumber",
        "InvalidProducerEpoch", "InvalidProducerIdMapping", "UnknownProducerIdError",
    }
)  # fmt: skip
