"""Circuit breakers: stop sending to an endpoint or service that keeps failing.

pybreaker's state machine counts and decides the transitions (``fail_max``
consecutive failures open the circuit; in half-open ``success_threshold``
successes close it and one failure opens it again). pybreaker wraps a call,
``breaker.call(fn)``, which fits neither async code (its ``call_async`` needs
tornado) nor a request path that decides before sending and learns the outcome
later. So ``Breaker`` splits the call in two: ``allow()`` before the attempt and
``record(success)`` after it, where the outcome is replayed through
``CircuitBreaker.call`` with a function that returns or raises.

Time is meshlib's: pybreaker compares wall-clock datetimes in its open state,
but the wrapper never calls into pybreaker while open; it moves the breaker to
half-open itself (``CircuitBreaker.half_open``) once ``reset_timeout`` has
passed on the injected clock, so tests drive time with a fake clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import NoReturn, Protocol

import pybreaker

log = logging.getLogger("meshlib.resilience.breaker")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

ChangeCallback = Callable[[str, str, str], None]
"""``callback(name, old_state, new_state)``, called after a transition."""


class _Failure(Exception):
    """Raised inside pybreaker's ``call`` to report a failed attempt."""


def _succeed() -> None:
    return None


def _fail() -> NoReturn:
    # A fresh instance each time: re-raising one instance would grow its traceback.
    raise _Failure


class _Listener(pybreaker.CircuitBreakerListener):
    """Forwards pybreaker's transitions to the wrapper (runs under its lock)."""

    def __init__(self, owner: Breaker) -> None:
        self._owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._owner._transition(old_state.name if old_state is not None else CLOSED, new_state.name)


class _Observable(Protocol):
    _lock: threading.Lock
    _callbacks: tuple[ChangeCallback, ...]


def _subscribe(owner: _Observable, callback: ChangeCallback) -> Callable[[], None]:
    """Add a state-change callback under the owner's lock; returns the unsubscribe."""
    with owner._lock:
        owner._callbacks = (*owner._callbacks, callback)

    def unsubscribe() -> None:
        with owner._lock:
            owner._callbacks = tuple(c for c in owner._callbacks if c is not callback)

    return unsubscribe


class Breaker:
    """One circuit breaker (per endpoint address or per service), sync and async alike.

    ``allow()`` before an attempt, ``record(success)`` after it. Closed: every
    attempt may go. Open: none until ``reset_timeout`` has passed, then the breaker
    is half-open and admits at most ``half_open_max`` concurrent probes; their
    outcomes close or reopen it.

    The closed-and-healthy path takes no lock (one attribute read per call); counters
    are updated without a lock, so under threads an increment may rarely be lost,
    which only skews a statistic.
    """

    __slots__ = (
        "__weakref__",  # followed by the metrics without being kept alive
        "_callbacks",
        "_cb",
        "_clock",
        "_lock",
        "_opened_at",
        "_pending",
        "_probe_at",
        "_probes",
        "_state",
        "_storage",
        "fail_max",
        "failures",
        "half_open_max",
        "healthy",
        "name",
        "opens",
        "rejected",
        "reset_timeout",
        "success_threshold",
        "successes",
    )

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 10.0,
        success_threshold: int = 1,
        half_open_max: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check(fail_max, reset_timeout, success_threshold, half_open_max)
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.success_threshold = success_threshold
        self.half_open_max = half_open_max
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self.healthy = True
        """Closed, with no failure since the last success: a success changes nothing
        and an attempt is allowed (the request path's fast lane reads only this)."""
        self._opened_at = 0.0
        self._probes = 0  # half-open probes admitted and not yet recorded
        self._probe_at = 0.0
        self._callbacks: tuple[ChangeCallback, ...] = ()
        self._pending: list[tuple[str, str]] = []
        self.successes = 0
        self.failures = 0
        self.rejected = 0
        self.opens = 0
        # Our own storage object, so the hot path reads the failure count directly.
        self._storage = pybreaker.CircuitMemoryStorage(CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            listeners=[_Listener(self)],
            state_storage=self._storage,
            name=name,
            # re-raise our _Failure on a trip instead of building a CircuitBreakerError
            throw_new_error_on_trip=False,
        )

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``.

        Reading it moves an open breaker whose ``reset_timeout`` has passed to
        half-open (pybreaker does the same on its next call), so a caller that skips
        open endpoints still lets them be probed again.
        """
        state = self._state
        if state != OPEN or self._clock() - self._opened_at < self.reset_timeout:
            return state
        self._half_open_if_due()
        return self._state

    @property
    def opened_at(self) -> float | None:
        """Clock time the breaker last opened; None while closed."""
        return None if self._state == CLOSED else self._opened_at

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success (pybreaker's fail counter)."""
        return self._storage.counter

    def allow(self) -> bool:
        """May an attempt go now? A True in half-open takes a probe slot.

        Every True must be followed by ``record`` (or ``release`` when the attempt
        never produced an outcome, e.g. it was cancelled). A probe that is never
        recorded is presumed lost after ``reset_timeout`` and its slot reused, so a
        leak cannot keep the breaker half-open forever.
        """
        state = self._state
        if state == CLOSED:
            return True
        if state == OPEN and self._clock() - self._opened_at < self.reset_timeout:
            self.rejected += 1
            return False
        with self._lock:
            now = self._clock()
            if self._state == OPEN:
                if now - self._opened_at < self.reset_timeout:
                    self.rejected += 1
                    return False
                self._cb.half_open()
            if self._state == CLOSED:
                allowed = True
            elif self._probes < self.half_open_max:
                self._probes += 1
                self._probe_at = now
                allowed = True
            elif now - self._probe_at >= self.reset_timeout:
                self._probes = 1
                self._probe_at = now
                allowed = True
            else:
                self.rejected += 1
                allowed = False
            pending = self._take_pending()
        self._notify(pending)
        return allowed

    def record(self, success: bool) -> None:
        """Feed the outcome of an attempt that ``allow`` let through.

        Outcomes arriving while open, or while half-open with no probe out, come from
        attempts admitted before the breaker tripped; they say nothing about whether
        the endpoint recovered and are only counted.
        """
        if success:
            self.successes += 1
            if self.healthy:
                return  # pybreaker would only reset a counter that is already 0
        else:
            self.failures += 1
        with self._lock:
            state = self._state
            if state == OPEN:
                return
            if state == HALF_OPEN:
                if not self._probes:
                    return
                self._probes -= 1
            try:
                self._cb.call(_succeed if success else _fail)
            except _Failure:
                pass
            except pybreaker.CircuitBreakerError:
                # Only raised by pybreaker's open state, which is never called.
                log.debug("breaker %s: pybreaker refused a recorded outcome", self.name)
            self.healthy = self._state == CLOSED and self._storage.counter == 0
            pending = self._take_pending()
        self._notify(pending)

    def release(self) -> None:
        """An admitted attempt ended without an outcome: free its probe slot."""
        if self._state != HALF_OPEN:
            return
        with self._lock:
            if self._state == HALF_OPEN and self._probes:
                self._probes -= 1

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(name, old, new)`` after each transition; returns an unsubscribe.

        Callbacks run on the thread that caused the transition, outside the breaker's
        lock; an exception in one is logged and does not reach the request.
        """
        return _subscribe(self, callback)

    def describe(self) -> dict[str, object]:
        """JSON-serialisable view for explain and config_dump."""
        state = self.state
        opened_at = self.opened_at
        retry_at = (
            opened_at + self.reset_timeout if state == OPEN and opened_at is not None else None
        )
        return {
            "name": self.name,
            "state": state,
            "consecutive_failures": self.consecutive_failures,
            "opened_at": opened_at,
            "retry_at": retry_at,
            "retry_in": None if retry_at is None else max(0.0, retry_at - self._clock()),
            "probes_in_flight": self._probes if state == HALF_OPEN else 0,
            "successes": self.successes,
            "failures": self.failures,
            "rejected": self.rejected,
            "opens": self.opens,
            "settings": {
                "fail_max": self.fail_max,
                "reset_timeout": self.reset_timeout,
                "success_threshold": self.success_threshold,
                "half_open_max": self.half_open_max,
            },
        }

    def _half_open_if_due(self) -> None:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout:
                self._cb.half_open()
            pending = self._take_pending()
        self._notify(pending)

    def _transition(self, old: str, new: str) -> None:
        # Called by pybreaker's listener, always under self._lock.
        if new == OPEN:
            self._opened_at = self._clock()  # before the state, for lock-free readers
            self.opens += 1
        self._probes = 0
        if new != CLOSED:
            self.healthy = False
        self._state = new
        self._pending.append((old, new))
        if new == OPEN:
            log.info(
                "circuit breaker %s opened after %d consecutive failures",
                self.name,
                self._storage.counter,
            )
        else:
            log.debug("circuit breaker %s: %s -> %s", self.name, old, new)

    def _take_pending(self) -> list[tuple[str, str]]:
        pending = self._pending
        if pending:
            self._pending = []
        return pending

    def _notify(self, pending: list[tuple[str, str]]) -> None:
        for old, new in pending:
            for callback in self._callbacks:
                try:
                    callback(self.name, old, new)
                except Exception:
                    log.exception("breaker %s: state change callback failed", self.name)

    def __repr__(self) -> str:
        return f"Breaker({self.name!r}, {self._state}, failures={self._storage.counter})"


def _check(fail_max: int, reset_timeout: float, success_threshold: int, half_open_max: int) -> None:
    if fail_max < 1:
        raise ValueError(f"fail_max must be >= 1, not {fail_max}")
    if not reset_timeout > 0:
        raise ValueError(f"reset_timeout must be > 0 seconds, not {reset_timeout}")
    if success_threshold < 1:
        raise ValueError(f"success_threshold must be >= 1, not {success_threshold}")
    if half_open_max < 1:
        raise ValueError(f"half_open_max must be >= 1, not {half_open_max}")


class BreakerBoard:
    """One ``Breaker`` per key (an endpoint address or a service name), made on first use.

    Bounded: past ``max_keys`` breakers, idle ones (closed, no failures since the last
    success) are dropped first, since a fresh breaker is indistinguishable from them;
    only if none is idle does the oldest go. ``on_change`` callbacks apply to every
    breaker of the board, present and future.
    """

    __slots__ = (
        "__weakref__",  # followed by the metrics without being kept alive
        "_breakers",
        "_callbacks",
        "_clock",
        "_lock",
        "fail_max",
        "half_open_max",
        "max_keys",
        "reset_timeout",
        "success_threshold",
    )

    def __init__(
        self,
        fail_max: int = 5,
        reset_timeout: float = 10.0,
        success_threshold: int = 1,
        half_open_max: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        _check(fail_max, reset_timeout, success_threshold, half_open_max)
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys}")
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.success_threshold = success_threshold
        self.half_open_max = half_open_max
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: dict[str, Breaker] = {}
        self._callbacks: tuple[ChangeCallback, ...] = ()

    def for_key(self, key: str) -> Breaker:
        """The breaker of ``key``, created closed on first use."""
        breaker = self._breakers.get(key)
        if breaker is not None:
            return breaker
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is None:
                if len(self._breakers) >= self.max_keys:
                    self._evict()
                breaker = Breaker(
                    key,
                    fail_max=self.fail_max,
                    reset_timeout=self.reset_timeout,
                    success_threshold=self.success_threshold,
                    half_open_max=self.half_open_max,
                    clock=self._clock,
                )
                breaker.on_change(self._forward)
                self._breakers[key] = breaker
            return breaker

    def allow(self, key: str) -> bool:
        """``allow()`` of the breaker of ``key``; no breaker yet means closed."""
        breaker = self._breakers.get(key)
        return breaker is None or breaker._state == CLOSED or breaker.allow()

    def record_success(self, key: str) -> None:
        """``record(True)`` on the breaker of ``key``, one call on the request path."""
        breaker = self._breakers.get(key) or self.for_key(key)
        if breaker.healthy:
            breaker.successes += 1
        else:
            breaker.record(True)

    def get(self, key: str) -> Breaker | None:
        """The breaker of ``key`` if one exists (for explain: never creates one)."""
        return self._breakers.get(key)

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Observe transitions of every breaker on the board; returns an unsubscribe."""
        return _subscribe(self, callback)

    def describe(self) -> dict[str, dict[str, object]]:
        """``describe()`` of every breaker, by key."""
        return {key: b.describe() for key, b in list(self._breakers.items())}

    def __len__(self) -> int:
        return len(self._breakers)

    def _forward(self, name: str, old: str, new: str) -> None:
        for callback in self._callbacks:
            try:
                callback(name, old, new)
            except Exception:
                log.exception("breaker board: state change callback failed for %s", name)

    def _evict(self) -> None:
        # Under self._lock. Readers see either the old or the new dict.
        kept = {
            k: b for k, b in self._breakers.items() if b._state != CLOSED or b._storage.counter != 0
        }
        if len(kept) >= self.max_keys:
            oldest = next(iter(kept))
            log.warning(
                "breaker board full (%d keys): dropping the breaker of %s in state %s",
                self.max_keys,
                oldest,
                kept[oldest]._state,
            )
            del kept[oldest]
        self._breakers = kept

    def __repr__(self) -> str:
        return f"BreakerBoard({len(self._breakers)} breakers, fail_max={self.fail_max})"
