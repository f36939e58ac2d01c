"""Per-cluster concurrency limits (Envoy's circuit-breaker thresholds)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("meshlib.resilience")


class _Waiter(ABC):
    """A caller queued for a request slot. ``granted`` is only touched under the lock."""

    __slots__ = ("granted",)

    def __init__(self) -> None:
        self.granted = False

    @abstractmethod
    def wake(self) -> bool:
        """Tell the waiter it got the slot; False if it can no longer be told."""


class _ThreadWaiter(_Waiter):
    __slots__ = ("cond",)

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        # One condition per waiter on the shared lock: a grant wakes exactly its thread.
        self.cond = threading.Condition(lock)

    def wake(self) -> bool:
        self.cond.notify()
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _TaskWaiter(_Waiter):
    __slots__ = ("future", "loop")

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        del lock  # same constructor as _ThreadWaiter; a task sleeps on its future
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = self.loop.create_future()

    def wake(self) -> bool:
        # The releasing caller may be on another thread or another loop.
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # its loop is closed: nobody is left to take the slot
            log.debug("bulkhead waiter's event loop is closed; passing its slot on")
            return False
        return True


_W = TypeVar("_W", bound=_Waiter)


def _wait(timeout: float) -> float | None:
    # The threading and asyncio timeouts take None, not inf, for "no limit".
    return None if timeout == math.inf else timeout


class Bulkhead:
    """Bounds requests in flight, callers waiting for a slot, and retries in flight.

    ``max_requests`` requests may be in flight at once. When all slots are taken, up to
    ``max_pending`` callers of ``enter_sync``/``enter_async`` wait, first come first
    served, with a timeout; beyond that a caller is refused at once (an overflow): a
    queue that can grow without bound only turns overload into latency. ``max_retries``
    bounds retries in flight separately, so that retries cannot take every slot while
    the upstream is failing. Every ``True`` from an enter method must be paired with one
    ``exit()`` (``exit_retry()`` for retries).

    A released slot is handed straight to the oldest waiter, so a newcomer calling
    ``try_enter`` cannot jump the queue. Threads and any number of event loops can share
    one bulkhead; all of them go through the same locked accounting below and differ
    only in how a waiter sleeps and is woken.
    """

    __slots__ = (
        "_lock",
        "_waiters",
        "inflight",
        "max_pending",
        "max_requests",
        "max_retries",
        "overflows",
        "retries_inflight",
        "retry_overflows",
        "timeouts",
    )

    max_requests: int
    max_pending: int
    max_retries: int
    inflight: int
    retries_inflight: int
    overflows: int
    """Requests refused: no free slot and no room (or no wish) to wait."""
    retry_overflows: int
    """Retries refused because ``max_retries`` were in flight."""
    timeouts: int
    """Callers that waited for a slot and gave up."""

    def __init__(self, max_requests: int, max_pending: int, max_retries: int) -> None:
        for name, value in (
            ("max_requests", max_requests),
            ("max_pending", max_pending),
            ("max_retries", max_retries),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        self.max_requests = max_requests
        self.max_pending = max_pending
        self.max_retries = max_retries
        self.inflight = 0
        self.retries_inflight = 0
        self.overflows = 0
        self.retry_overflows = 0
        self.timeouts = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    @property
    def pending(self) -> int:
        """Callers waiting for a slot now."""
        return len(self._waiters)

    # The shared accounting: every method below runs with self._lock held.

    def _admit_locked(self) -> bool:
        # While anyone waits, every slot is taken (releases hand over), so no queue check.
        if self.inflight < self.max_requests:
            self.inflight += 1
            return True
        return False

    def _queue_locked(self, waiter: _Waiter) -> bool:
        if len(self._waiters) >= self.max_pending:
            self.overflows += 1
            return False
        self._waiters.append(waiter)
        return True

    def _release_locked(self) -> None:
        if self.inflight <= 0:
            raise RuntimeError("Bulkhead.exit() called more often than enter succeeded")
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            waiter.granted = True
            if waiter.wake():
                return  # the slot changes hands; inflight stays the same
        self.inflight -= 1

    def _leave_locked(self, waiter: _Waiter, keep: bool) -> bool:
        """A waiter stops waiting; returns whether it holds a slot.

        If the slot was granted meanwhile, the waiter keeps it when ``keep``, else passes
        it on; the granted flag, not the wake-up, decides, so no slot leaks.
        """
        if waiter.granted:
            if keep:
                return True
            self._release_locked()
            return False
        self._waiters.remove(waiter)
        return False

    # Public API.

    def try_enter(self) -> bool:
        """Take a request slot if one is free now; never waits."""
        with self._lock:
            if self._admit_locked():
                return True
            self.overflows += 1
            return False

    def enter_if_free(self) -> bool:
        """Like ``try_enter`` but a refusal is not an overflow: the caller will wait."""
        with self._lock:
            if self.inflight < self.max_requests:
                self.inflight += 1
                return True
            return False

    def exit(self) -> None:
        """Give back a request slot, to the oldest waiter if there is one."""
        with self._lock:
            if self._waiters or self.inflight <= 0:
                self._release_locked()
            else:
                self.inflight -= 1  # nobody waits: the common case, without a call

    def _enter_or_queue_locked(
        self, timeout: float, waiter: Callable[[threading.Lock], _W]
    ) -> _W | bool:
        """True if admitted, False if refused, else a new waiter, now in line."""
        if self._admit_locked():
            return True
        if not timeout > 0:  # zero, negative or NaN: don't wait
            self.overflows += 1
            return False
        queued = waiter(self._lock)
        return queued if self._queue_locked(queued) else False

    def enter_sync(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds in line if none is free.

        False at once when the line is full, or after ``timeout``; ``timeout`` may be
        ``math.inf``.
        """
        with self._lock:
            waiter = self._enter_or_queue_locked(timeout, _ThreadWaiter)
            if isinstance(waiter, bool):
                return waiter
            try:
                got = waiter.cond.wait_for(lambda: waiter.granted, _wait(timeout))
            except BaseException:  # KeyboardInterrupt and the like: don't leak the slot
                self._leave_locked(waiter, keep=False)
                raise
            if got or self._leave_locked(waiter, keep=True):
                return True
            self.timeouts += 1
            return False

    async def enter_async(self, timeout: float) -> bool:
        """Like ``enter_sync`` for a coroutine: waits on a future of the running loop.

        Cancelled while waiting, it leaves the line, or passes on a slot that was
        granted in the meantime, and re-raises.
        """
        with self._lock:
            waiter = self._enter_or_queue_locked(timeout, _TaskWaiter)
        if isinstance(waiter, bool):
            return waiter
        try:
            async with asyncio.timeout(_wait(timeout)):
                await waiter.future
        except TimeoutError:
            with self._lock:
                if self._leave_locked(waiter, keep=True):
                    return True  # granted just as the timer fired: take it
                self.timeouts += 1
            return False
        except BaseException:  # cancelled
            with self._lock:
                self._leave_locked(waiter, keep=False)
            raise
        return True

    def try_enter_retry(self) -> bool:
        """Count a retry in flight if fewer than ``max_retries`` are; never waits."""
        with self._lock:
            if self.retries_inflight < self.max_retries:
                self.retries_inflight += 1
                return True
            self.retry_overflows += 1
            return False

    def exit_retry(self) -> None:
        """A retry admitted by ``try_enter_retry`` finished."""
        with self._lock:
            if self.retries_inflight <= 0:
                raise RuntimeError("Bulkhead.exit_retry() called more often than admitted")
            self.retries_inflight -= 1

    def snapshot(self) -> dict[str, object]:
        """JSON-serialisable state for explain and metrics."""
        return {
            "max_requests": self.max_requests,
            "max_pending": self.max_pending,
            "max_retries": self.max_retries,
            "inflight": self.inflight,
            "pending": len(self._waiters),
            "retries_inflight": self.retries_inflight,
            "overflows": self.overflows,
            "retry_overflows": self.retry_overflows,
            "timeouts": self.timeouts,
        }

    def __repr__(self) -> str:
        return (
            f"Bulkhead(inflight={self.inflight}/{self.max_requests}, "
            f"pending={len(self._waiters)}/{self.max_pending}, "
            f"retries={self.retries_inflight}/{self.max_retries})"
        )
