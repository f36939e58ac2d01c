"""Circuit breakers in meshlib.resilience.breaker: unit tests and a reference model."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.resilience.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerBoard


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    clock: FakeClock,
    *,
    fail_max: int = 3,
    reset_timeout: float = 10.0,
    success_threshold: int = 1,
    half_open_max: int = 1,
) -> Breaker:
    return Breaker(
        "ep",
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        success_threshold=success_threshold,
        half_open_max=half_open_max,
        clock=clock,
    )


def trip(b: Breaker) -> None:
    for _ in range(b.fail_max):
        assert b.allow()
        b.record(False)
    assert b.state == OPEN


def test_closed_allows_and_success_resets_the_failure_count() -> None:
    b = make(FakeClock())
    for _ in range(10):
        assert b.allow()
        b.record(False)
        b.record(False)
        assert b.consecutive_failures == 2
        b.record(True)
        assert b.consecutive_failures == 0
    assert b.state == CLOSED
    assert b.opened_at is None
    assert (b.successes, b.failures, b.opens) == (10, 20, 0)


def test_fail_max_consecutive_failures_open_it() -> None:
    clock = FakeClock()
    b = make(clock, fail_max=3)
    b.record(False)
    b.record(False)
    assert b.state == CLOSED
    b.record(False)
    assert b.state == OPEN
    assert b.opened_at == clock.now
    assert b.opens == 1
    assert not b.allow()
    assert b.rejected == 1


def test_open_rejects_until_reset_timeout_then_admits_limited_probes() -> None:
    clock = FakeClock()
    b = make(clock, reset_timeout=10.0, half_open_max=2)
    trip(b)
    clock.advance(9.999)
    assert not b.allow()
    clock.advance(0.001)
    assert b.allow()
    assert b.state == HALF_OPEN
    assert b.allow()
    assert not b.allow()  # both probe slots taken
    b.record(True)
    assert b.state == CLOSED
    assert b.allow()


def test_half_open_needs_success_threshold_successes() -> None:
    clock = FakeClock()
    b = make(clock, success_threshold=3, half_open_max=1)
    trip(b)
    clock.advance(10)
    for _ in range(2):
        assert b.allow()
        assert not b.allow()
        b.record(True)
        assert b.state == HALF_OPEN
    assert b.allow()
    b.record(True)
    assert b.state == CLOSED
    assert b.consecutive_failures == 0


def test_a_failed_probe_opens_it_again_with_a_fresh_timeout() -> None:
    clock = FakeClock()
    b = make(clock, success_threshold=2)
    trip(b)
    clock.advance(15)
    assert b.allow()
    b.record(True)
    assert b.allow()
    b.record(False)
    assert b.state == OPEN
    assert b.opened_at == clock.now
    assert b.opens == 2
    clock.advance(9)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()


def test_reading_state_half_opens_a_due_breaker() -> None:
    # Callers that skip open endpoints never call allow(); reading the state must let
    # the endpoint be probed again.
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(10)
    assert b.state == HALF_OPEN
    assert b.allow()
    assert not b.allow()


def test_outcomes_of_attempts_admitted_before_the_trip_are_ignored() -> None:
    clock = FakeClock()
    b = make(clock, fail_max=1)
    assert b.allow()  # a slow request is in flight
    b.record(False)
    assert b.state == OPEN
    b.record(True)  # the slow one finishes: says nothing about recovery
    assert b.state == OPEN
    clock.advance(10)
    assert b.state == HALF_OPEN
    b.record(True)  # no probe out: a straggler again
    assert b.state == HALF_OPEN
    assert b.allow()
    b.record(True)
    assert b.state == CLOSED


def test_release_frees_a_probe_slot() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(10)
    assert b.allow()
    assert not b.allow()
    b.release()  # e.g. the attempt was cancelled
    assert b.allow()
    assert b.state == HALF_OPEN


def test_a_lost_probe_is_reclaimed_after_reset_timeout() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(10)
    assert b.allow()  # never recorded
    clock.advance(9)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()


def test_on_change_reports_every_transition_and_can_unsubscribe() -> None:
    clock = FakeClock()
    b = make(clock, fail_max=1)
    seen: list[tuple[str, str, str]] = []
    unsubscribe = b.on_change(lambda *change: seen.append(change))
    b.record(False)
    clock.advance(10)
    assert b.allow()
    b.record(False)
    clock.advance(10)
    assert b.allow()
    b.record(True)
    assert seen == [
        ("ep", CLOSED, OPEN),
        ("ep", OPEN, HALF_OPEN),
        ("ep", HALF_OPEN, OPEN),
        ("ep", OPEN, HALF_OPEN),
        ("ep", HALF_OPEN, CLOSED),
    ]
    unsubscribe()
    b.record(False)
    assert b.state == OPEN
    assert len(seen) == 5


def test_a_failing_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    b = make(FakeClock(), fail_max=1)
    seen: list[str] = []

    def broken(name: str, old: str, new: str) -> None:
        raise RuntimeError("metrics down")

    b.on_change(broken)
    b.on_change(lambda name, old, new: seen.append(new))
    with caplog.at_level(logging.ERROR, logger="meshlib.resilience.breaker"):
        b.record(False)
    assert b.state == OPEN
    assert seen == [OPEN]
    assert "callback failed" in caplog.text


def test_a_callback_may_read_the_breaker() -> None:
    # Callbacks run outside the lock, so reading state from one cannot deadlock.
    b = make(FakeClock(), fail_max=1)
    states: list[str] = []
    b.on_change(lambda name, old, new: states.append(b.state))
    b.record(False)
    assert states == [OPEN]


def test_describe() -> None:
    clock = FakeClock()
    b = make(clock, fail_max=1)
    b.record(False)
    view = b.describe()
    assert view["state"] == OPEN
    assert view["opened_at"] == clock.now
    assert view["retry_at"] == clock.now + 10
    clock.advance(4)
    assert b.describe()["retry_in"] == 6
    assert view["opens"] == 1
    assert view["settings"] == {
        "fail_max": 1,
        "reset_timeout": 10.0,
        "success_threshold": 1,
        "half_open_max": 1,
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fail_max": 0},
        {"reset_timeout": 0},
        {"success_threshold": 0},
        {"half_open_max": 0},
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Breaker("x", **kwargs)  # type: ignore[arg-type]


def test_half_open_admits_exactly_half_open_max_concurrent_probes() -> None:
    clock = FakeClock()
    b = make(clock, half_open_max=3)
    trip(b)
    clock.advance(10)
    barrier = threading.Barrier(16)
    results: list[bool] = []

    def probe() -> None:
        barrier.wait()
        results.append(b.allow())

    threads = [threading.Thread(target=probe) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 3


def test_async_callers_use_allow_and_record() -> None:
    clock = FakeClock()
    b = make(clock, fail_max=2)

    async def call(fail: bool) -> str:
        if not b.allow():
            return "rejected"
        try:
            await asyncio.sleep(0)
            if fail:
                raise ConnectionError
        except ConnectionError:
            b.record(False)
            return "failed"
        b.record(True)
        return "ok"

    async def main() -> list[str]:
        return [await call(f) for f in (False, True, True, False)]

    assert asyncio.run(main()) == ["ok", "failed", "failed", "rejected"]


def test_real_clock_half_opens_after_a_tiny_reset_timeout() -> None:
    # The default clock, with bounded polling: no assertion about how long it took.
    b = Breaker("real", fail_max=1, reset_timeout=0.05)
    b.record(False)
    assert not b.allow()
    deadline = time.monotonic() + 5
    while not b.allow():
        assert time.monotonic() < deadline, "breaker never half-opened"
        time.sleep(0.01)
    b.record(True)
    assert b.state == CLOSED


def test_pybreaker_state_follows() -> None:
    clock = FakeClock()
    b = make(clock, fail_max=1)
    b.record(False)
    assert b._cb.current_state == OPEN
    clock.advance(10)
    assert b.allow()
    assert b._cb.current_state == HALF_OPEN
    b.record(True)
    assert b._cb.current_state == CLOSED


# -- board -------------------------------------------------------------------


def test_board_creates_one_breaker_per_key_lazily() -> None:
    board = BreakerBoard(2, 5.0, 1, 1, clock=FakeClock())
    assert board.get("a:1") is None
    a = board.for_key("a:1")
    assert board.for_key("a:1") is a
    assert board.for_key("users") is not a
    assert len(board) == 2
    assert (a.fail_max, a.reset_timeout) == (2, 5.0)
    assert set(board.describe()) == {"a:1", "users"}


def test_board_callbacks_see_every_breaker() -> None:
    board = BreakerBoard(1, 5.0, 1, 1, clock=FakeClock())
    before = board.for_key("a:1")
    seen: list[tuple[str, str, str]] = []
    board.on_change(lambda *change: seen.append(change))
    before.record(False)
    board.for_key("b:1").record(False)
    assert seen == [("a:1", CLOSED, OPEN), ("b:1", CLOSED, OPEN)]


def test_board_is_bounded_and_drops_idle_breakers_first() -> None:
    board = BreakerBoard(1, 5.0, 1, 1, clock=FakeClock(), max_keys=3)
    board.for_key("open").record(False)
    board.for_key("idle1")
    board.for_key("idle2")
    board.for_key("new")
    assert len(board) <= 3
    assert board.get("open") is not None
    assert board.get("open").state == OPEN  # type: ignore[union-attr]
    assert board.get("new") is not None


def test_board_drops_the_oldest_when_none_is_idle(caplog: pytest.LogCaptureFixture) -> None:
    board = BreakerBoard(1, 5.0, 1, 1, clock=FakeClock(), max_keys=2)
    board.for_key("a").record(False)
    board.for_key("b").record(False)
    with caplog.at_level(logging.WARNING, logger="meshlib.resilience.breaker"):
        board.for_key("c")
    assert board.get("a") is None
    assert board.get("b") is not None
    assert board.get("c") is not None
    assert "board full" in caplog.text


# -- reference model -----------------------------------------------------------


@dataclass
class Model:
    """The breaker's contract, written out plainly."""

    fail_max: int
    success_threshold: int
    half_open_max: int
    reset_timeout: float
    now: float = 0.0
    state: str = CLOSED
    fails: int = 0
    successes: int = 0
    probes: int = 0
    probe_at: float = 0.0
    opened_at: float = 0.0
    changes: list[tuple[str, str]] = field(default_factory=list)

    def _go(self, new: str) -> None:
        self.changes.append((self.state, new))
        self.state = new
        self.probes = 0
        if new == OPEN:
            self.opened_at = self.now
        elif new == HALF_OPEN:
            self.successes = 0
        else:
            self.fails = 0
            self.successes = 0

    def _half_open_if_due(self) -> None:
        if self.state == OPEN and self.now - self.opened_at >= self.reset_timeout:
            self._go(HALF_OPEN)

    def read_state(self) -> str:
        self._half_open_if_due()
        return self.state

    def allow(self) -> bool:
        self._half_open_if_due()
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return False
        if self.probes < self.half_open_max:
            self.probes += 1
            self.probe_at = self.now
            return True
        if self.now - self.probe_at >= self.reset_timeout:
            self.probes = 1
            self.probe_at = self.now
            return True
        return False

    def record(self, ok: bool) -> None:
        if self.state == OPEN or (self.state == HALF_OPEN and self.probes == 0):
            return
        if self.state == HALF_OPEN:
            self.probes -= 1
            if ok:
                self.fails = 0
                self.successes += 1
                if self.successes >= self.success_threshold:
                    self._go(CLOSED)
            else:
                self.fails += 1
                self._go(OPEN)
            return
        if ok:
            self.fails = 0
        else:
            self.fails += 1
            if self.fails >= self.fail_max:
                self._go(OPEN)

    def release(self) -> None:
        if self.state == HALF_OPEN and self.probes:
            self.probes -= 1


ops_st = st.lists(
    st.one_of(
        st.sampled_from(["allow", "ok", "fail", "release", "state"]),
        st.sampled_from([1, 4, 5, 9, 10, 11]).map(lambda s: ("advance", s)),
    ),
    # long runs: the interesting paths need a trip, a wait and several probes
    min_size=20,
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    fail_max=st.integers(1, 4),
    success_threshold=st.integers(1, 3),
    half_open_max=st.integers(1, 3),
    ops=ops_st,
)
def test_breaker_matches_the_reference_model(
    fail_max: int, success_threshold: int, half_open_max: int, ops: list[object]
) -> None:
    clock = FakeClock(0.0)
    b = Breaker(
        "m",
        fail_max=fail_max,
        reset_timeout=10.0,
        success_threshold=success_threshold,
        half_open_max=half_open_max,
        clock=clock,
    )
    seen: list[tuple[str, str]] = []
    b.on_change(lambda name, old, new: seen.append((old, new)))
    m = Model(fail_max, success_threshold, half_open_max, 10.0)
    for op in ops:
        if isinstance(op, tuple):
            clock.advance(op[1])
            m.now = clock.now
        elif op == "allow":
            assert b.allow() == m.allow()
        elif op == "ok":
            b.record(True)
            m.record(True)
        elif op == "fail":
            b.record(False)
            m.record(False)
        elif op == "release":
            b.release()
            m.release()
        else:
            assert b.state == m.read_state()
        assert b._state == m.state
        assert b._cb.current_state == m.state  # pybreaker agrees
        if m.state == CLOSED:
            assert b.consecutive_failures == m.fails
        assert seen == m.changes
    assert b.opens == sum(1 for _, new in m.changes if new == OPEN)
