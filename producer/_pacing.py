"""Sharing the GIL with the request path, and waiting for work (see the module docstring of
``_producer``: "Sharing the GIL")."""

from __future__ import annotations

import asyncio
import time

from ._state import ProducerState

# Sharing the GIL with the request path (see AuditProducer._pace). The middleware stamps
# ``_request_seen`` when a request starts, sends body messages and ends; the request path counts
# as active for _QUIET_SECS after that.
_HOLD_BUSY_SECS = 50e-6  # longest stretch the sender holds the GIL while requests are active
_HOLD_IDLE_SECS = 2e-3  # ... while the request path is quiet (each yield costs ~90 us idle)
_QUIET_SECS = 1e-3
_DEFER_STEP_SECS = 0.02  # while requests are active, the sender waits in steps of this ...
_DEFER_MAX_SECS = 0.1  # ... for at most this long, and only while the queue is under 1/4 full
_POLL_WHILE_ACTIVE_SECS = 1.0  # an idle sender polls (emit() does not wake it) this long after


class Pacing(ProducerState):
    def _wakeup(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # loop closed meanwhile
                pass

    def _wake_blocked(self) -> None:
        """Wake emit() calls waiting for space (``when_full = "block"``)."""
        if self._blocked:
            with self._space:
                self._space.notify_all()

    def _requests_active(self, now: float, within: float = _QUIET_SECS) -> bool:
        return now - self._request_seen < within

    def _pace(self, coarse: bool = False) -> bool:
        """Called between events in every loop of the sender. Yields the GIL when this thread
        has held it long enough: ``_HOLD_BUSY_SECS`` while the request path is active (a request
        that wants the GIL otherwise waits for the interpreter's switch interval, 5 ms), else
        ``_HOLD_IDLE_SECS`` (a yield costs ~90 us of idle time, so this keeps throughput up
        when no request is waiting). ``coarse``: always the latter (handing a batch over to
        aiokafka costs ~1.5 us per event; one stall per batch beats several). Returns whether
        the request path is active."""
        now = time.perf_counter()
        busy = now - self._request_seen < _QUIET_SECS
        fine = busy and not coarse
        if now - self._last_yield > (_HOLD_BUSY_SECS if fine else _HOLD_IDLE_SECS):
            time.sleep(0)
            self._last_yield = time.perf_counter()
        return busy

    def _should_defer(self) -> bool:
        """While requests are running and the backlog is small, the sender stays out of their
        way (it works in their gaps), for at most ``_DEFER_MAX_SECS`` at a time."""
        now = time.perf_counter()
        if not self._accepting or not self._requests_active(now):
            self._defer_since = None
            return False
        if len(self._buf) >= self._defer_backlog:
            return False
        if self._defer_since is None:
            self._defer_since = now
        return now - self._defer_since < _DEFER_MAX_SECS

    async def _idle_wait(self, wait_secs: float | None, wakeable: bool = True) -> None:
        """Wait for ``wait_secs`` (None: until woken). ``wakeable``: emit() may wake us early
        (stop() always can)."""
        assert self._wake is not None
        self._idle = wakeable
        if not self._buf or wait_secs is not None:
            try:
                await asyncio.wait_for(self._wake.wait(), wait_secs)
            except TimeoutError:
                pass
        self._wake.clear()
        self._idle = False
