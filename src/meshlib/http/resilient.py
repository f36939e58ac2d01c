"""The attempt loops of the httpx transports: thin drivers around CallControl.

Everything that is decided (which endpoint, which limit, retry or not) is
decided by `meshlib.resilience.attempts.CallControl`; these loops only wait,
send and report. The sync and async loops mirror each other line by line.

A sampled call has a `ClientTrace` (``trace``): each attempt then goes out in its own
span, whose context its headers carry. Without one (tracing off, or not sampled) the
only cost is a test of ``trace`` per attempt.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable
from concurrent import futures
from typing import TYPE_CHECKING

import httpx

from meshlib.endpoint import Endpoint
from meshlib.errors import OverloadedError
from meshlib.http.plan import Plan
from meshlib.resilience import fastlane
from meshlib.resilience.attempts import Attempt, CallControl
from meshlib.resilience.faults import Fault, decide_fault
from meshlib.resilience.limits import Bulkhead
from meshlib.resilience.policy import NO_POLICY
from meshlib.routing.decide import pick_another
from meshlib.routing.request import RequestView
from meshlib.telemetry.metrics import METRICS
from meshlib.telemetry.tracing import end_attempt

if TYPE_CHECKING:
    from meshlib.http.async_transport import AsyncMeshTransport
    from meshlib.http.sync_transport import MeshTransport
    from meshlib.telemetry.tracing import ClientTrace

ATTEMPT_HEADER = b"x-mesh-attempt"
TIMEOUT_HEADER = fastlane.TIMEOUT_HEADER
FAULT_HEADER = b"x-mesh-fault"


class _Send:
    """What every attempt of one call sends: the request, its target, the headers
    without attempt headers, and the buffered body (None: send the request's own)."""

    __slots__ = ("body", "decision", "headers", "request", "rng", "target", "tls")

    def __init__(
        self, request: httpx.Request, plan: Plan, rng: random.Random, body: bytes | None
    ) -> None:
        self.request = request
        self.decision = plan.decision
        self.target = plan.target
        self.tls = plan.tls
        self.rng = rng
        self.body = body
        self.headers = _own_headers(plan.headers)

    def pick(self, avoid: frozenset[str]) -> Endpoint:
        """Another endpoint for a retry or hedge (the request view is built only then)."""
        path, _, query = self.decision.target.partition("?")
        request = self.request
        view = RequestView(request.method, path, query, request.headers)
        return pick_another(self.decision.cluster, view, self.rng, avoid)


def _prepare(plan: Plan, request: httpx.Request, rng: random.Random) -> tuple[CallControl, _Send]:
    decision = plan.decision
    policy = decision.route.action.policy or NO_POLICY
    body = None
    replayable = True
    if policy.retry is not None or policy.hedge is not None:
        try:
            content = request.content
        except httpx.RequestNotRead:  # a streamed body cannot be replayed
            replayable = False
        else:
            limit = policy.retry.max_body_bytes if policy.retry is not None else 65536
            replayable = len(content) <= limit
            body = content if replayable else None
    send = _Send(request, plan, rng, body)
    control = CallControl(
        decision.service.name,
        policy,
        decision.cluster.guard,
        send.pick,
        method=request.method,
        replayable=replayable,
        clock=time.monotonic,
        rng=rng,
    )
    return control, send


Headers = list[tuple[bytes, bytes]]
_ATTEMPT_HEADERS = frozenset((ATTEMPT_HEADER, TIMEOUT_HEADER))


def _own_headers(headers: Headers) -> Headers:
    """The headers without x-mesh-attempt / x-mesh-timeout-ms that the application
    forwarded from its own inbound request: each attempt sends its own, once."""
    for name, _ in headers:  # lower() and a set: the cheapest test between real requests
        if name.lower() in _ATTEMPT_HEADERS:
            return [(n, v) for n, v in headers if n.lower() not in _ATTEMPT_HEADERS]
    return headers


def _attempt_headers(headers: Headers, attempt: Attempt) -> Headers:
    """The headers of one attempt: its time limit, and its number from the second on
    (gRPC's convention: no attempt header means the first attempt)."""
    number = attempt.number
    if number > 1:
        value = _ATTEMPT_VALUES[number] if number < len(_ATTEMPT_VALUES) else b"%d" % number
        headers = [*headers, (ATTEMPT_HEADER, value)]
        if attempt.timeout is None:
            return headers
    elif attempt.timeout is None:
        return headers
    return [*headers, (TIMEOUT_HEADER, b"%d" % max(1, int(attempt.timeout * 1000)))]


_ATTEMPT_VALUES = [b"%d" % number for number in range(12)]


def _fault(control: CallControl, request: httpx.Request, rng: random.Random) -> Fault | None:
    faults = control.policy.faults
    return None if faults is None else decide_fault(faults, request.headers, rng)


def _report_resent(
    transport: MeshTransport | AsyncMeshTransport, plan: Plan, control: CallControl
) -> None:
    decision = plan.decision
    METRICS.resent(
        transport._caller_name,
        decision.service.name,
        decision.route.name,
        decision.cluster.subset,
        control.retries,
        control.hedges,
    )


def _line(control: CallControl) -> tuple[Bulkhead, float]:
    """The bulkhead to wait in when ``admit`` found no free slot, and for how long."""
    guard = control.guard
    assert guard is not None and guard.bulkhead is not None
    return guard.bulkhead, guard.pending_timeout


def _fault_response(status: int) -> httpx.Response:
    return httpx.Response(
        status,
        headers=[(FAULT_HEADER, b"abort")],
        content=b"fault injected",
        extensions={"mesh": {"attempts": 0, "endpoint": "", "flags": ["faulted"]}},
    )


def _flag_ejected(response: httpx.Response, endpoint: Endpoint) -> None:
    """The fast lane's one attempt made outlier detection eject an endpoint."""
    response.extensions["mesh"] = {
        "attempts": 1,
        "endpoint": endpoint.address,
        "flags": ["ejected"],
    }


def run_sync(
    transport: MeshTransport,
    request: httpx.Request,
    plan: Plan,
    trace: ClientTrace | None = None,
) -> httpx.Response:
    """Timeouts, retries, budget, breakers, limits and faults around sync sends.

    The first attempt goes through the fast lane when it can; anything beyond a
    first response that ends the call is handed to the attempt loop."""
    decision = plan.decision
    lane = decision.route.action.lanes.get(decision.cluster.name)
    endpoint = decision.endpoint
    now = time.monotonic()
    if lane is None or (first := fastlane.enter(lane, endpoint.address, now)) is None:
        return _loop_sync(transport, request, plan, None, None, trace)
    headers = plan.headers
    for name, _ in headers:  # _own_headers, inlined (as below, in run_async)
        if name.lower() in _ATTEMPT_HEADERS:
            headers = _own_headers(headers)
            break
    if first.header is not None:
        headers = [*headers, first.header]
    span = None
    if trace is not None:
        headers, span = trace.attempt(headers, endpoint, 1, first.timeout)
    try:
        response = transport._send(
            request, endpoint, plan.target, headers, first.timeout, None, plan.tls
        )
    except httpx.TransportError as exc:
        if span is not None:
            end_attempt(span, None, exc)
        return _loop_sync(transport, request, plan, fastlane.entry(lane, now), exc, trace)
    except BaseException as exc:
        if span is not None:
            end_attempt(span, None, exc)
        fastlane.leave(lane)
        raise
    if span is not None:
        end_attempt(span, response.status_code, None)
    if settled := fastlane.settle(lane, endpoint.address, response.status_code):
        if settled == fastlane.EJECTED:
            _flag_ejected(response, endpoint)
        return response
    return _loop_sync(transport, request, plan, fastlane.entry(lane, now), response, trace)


def send_once_sync(
    transport: MeshTransport, request: httpx.Request, plan: Plan, trace: ClientTrace
) -> httpx.Response:
    """A traced call without resilience policy: its one attempt, in its span."""
    headers, span = trace.attempt(plan.headers, plan.decision.endpoint, 1, plan.timeout)
    try:
        response = transport._send(
            request, plan.decision.endpoint, plan.target, headers, plan.timeout, None, plan.tls
        )
    except BaseException as exc:
        end_attempt(span, None, exc)
        raise
    end_attempt(span, response.status_code, None)
    return response


def _loop_sync(
    transport: MeshTransport,
    request: httpx.Request,
    plan: Plan,
    entry: fastlane.Entry | None,
    outcome: Outcome | None,
    trace: ClientTrace | None,
) -> httpx.Response:
    """The attempt loop: from the start (no ``entry``), or after the fast lane's first
    attempt, whose ``outcome`` it records first."""
    control, send = _prepare(plan, request, transport._rng)
    try:
        if entry is not None:
            attempt = control.resume(entry, plan.decision.endpoint)
        else:
            if not control.admit():
                bulkhead, wait = _line(control)
                if not bulkhead.enter_sync(wait):
                    raise OverloadedError(_overflow(control))
                control.holds_slot = True
            fault = _fault(control, request, transport._rng)
            if fault is not None:
                if trace is not None:
                    trace.fault(fault)
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.abort_status is not None:
                    return _fault_response(fault.abort_status)
            attempt = control.first(plan.decision.endpoint)
        while True:
            if outcome is None:
                if attempt.delay:
                    time.sleep(attempt.delay)
                if control.policy.hedge is None:
                    outcome = _send_sync(transport, send, control, attempt, trace)
                else:
                    attempt, outcome = _race_sync(transport, send, control, attempt, trace)
            if not isinstance(outcome, httpx.Response):
                failed, attempt = attempt, control.on_error(attempt, outcome)
                if trace is not None:
                    trace.retry(failed, attempt, outcome)
                outcome = None
                continue
            following = control.on_status(attempt, outcome.status_code)
            if following is None:
                outcome.extensions["mesh"] = control.report(attempt)
                return outcome
            if trace is not None:
                trace.retry(attempt, following, outcome.status_code)
            outcome.close()
            attempt, outcome = following, None
    finally:
        control.finish()
        if control.retries or control.hedges:
            _report_resent(transport, plan, control)


async def run_async(
    transport: AsyncMeshTransport,
    request: httpx.Request,
    plan: Plan,
    trace: ClientTrace | None = None,
) -> httpx.Response:
    """The async twin of run_sync."""
    decision = plan.decision
    lane = decision.route.action.lanes.get(decision.cluster.name)
    endpoint = decision.endpoint
    now = time.monotonic()
    if lane is None or (first := fastlane.enter(lane, endpoint.address, now)) is None:
        return await _loop_async(transport, request, plan, None, None, trace)
    headers = plan.headers
    for name, _ in headers:
        if name.lower() in _ATTEMPT_HEADERS:
            headers = _own_headers(headers)
            break
    if first.header is not None:
        headers = [*headers, first.header]
    span = None
    if trace is not None:
        headers, span = trace.attempt(headers, endpoint, 1, first.timeout)
    try:
        response = await transport._send(
            request, endpoint, plan.target, headers, first.timeout, None, plan.tls
        )
    except httpx.TransportError as exc:
        if span is not None:
            end_attempt(span, None, exc)
        return await _loop_async(transport, request, plan, fastlane.entry(lane, now), exc, trace)
    except BaseException as exc:
        if span is not None:
            end_attempt(span, None, exc)
        fastlane.leave(lane)
        raise
    if span is not None:
        end_attempt(span, response.status_code, None)
    if settled := fastlane.settle(lane, endpoint.address, response.status_code):
        if settled == fastlane.EJECTED:
            _flag_ejected(response, endpoint)
        return response
    entry = fastlane.entry(lane, now)
    return await _loop_async(transport, request, plan, entry, response, trace)


async def send_once_async(
    transport: AsyncMeshTransport, request: httpx.Request, plan: Plan, trace: ClientTrace
) -> httpx.Response:
    """The async twin of send_once_sync."""
    headers, span = trace.attempt(plan.headers, plan.decision.endpoint, 1, plan.timeout)
    try:
        response = await transport._send(
            request, plan.decision.endpoint, plan.target, headers, plan.timeout, None, plan.tls
        )
    except BaseException as exc:
        end_attempt(span, None, exc)
        raise
    end_attempt(span, response.status_code, None)
    return response


async def _loop_async(
    transport: AsyncMeshTransport,
    request: httpx.Request,
    plan: Plan,
    entry: fastlane.Entry | None,
    outcome: Outcome | None,
    trace: ClientTrace | None,
) -> httpx.Response:
    """The async twin of _loop_sync."""
    control, send = _prepare(plan, request, transport._rng)
    try:
        if entry is not None:
            attempt = control.resume(entry, plan.decision.endpoint)
        else:
            if not control.admit():
                bulkhead, wait = _line(control)
                if not await bulkhead.enter_async(wait):
                    raise OverloadedError(_overflow(control))
                control.holds_slot = True
            fault = _fault(control, request, transport._rng)
            if fault is not None:
                if trace is not None:
                    trace.fault(fault)
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.abort_status is not None:
                    return _fault_response(fault.abort_status)
            attempt = control.first(plan.decision.endpoint)
        while True:
            if outcome is None:
                if attempt.delay:
                    await asyncio.sleep(attempt.delay)
                if control.policy.hedge is None:
                    outcome = await _send_async(transport, send, control, attempt, trace)
                else:
                    attempt, outcome = await _race_async(transport, send, control, attempt, trace)
            if not isinstance(outcome, httpx.Response):
                failed, attempt = attempt, control.on_error(attempt, outcome)
                if trace is not None:
                    trace.retry(failed, attempt, outcome)
                outcome = None
                continue
            following = control.on_status(attempt, outcome.status_code)
            if following is None:
                outcome.extensions["mesh"] = control.report(attempt)
                return outcome
            if trace is not None:
                trace.retry(attempt, following, outcome.status_code)
            await outcome.aclose()
            attempt, outcome = following, None
    finally:
        control.finish()
        if control.retries or control.hedges:
            _report_resent(transport, plan, control)


Outcome = httpx.Response | httpx.TransportError


def _good(outcome: Outcome) -> bool:
    return isinstance(outcome, httpx.Response) and outcome.status_code < 500


def _race_sync(
    transport: MeshTransport,
    send: _Send,
    control: CallControl,
    attempt: Attempt,
    trace: ClientTrace | None,
) -> tuple[Attempt, Outcome]:
    """Send one attempt and race a backup after the hedge delay.

    The first good answer wins; the loser's outcome is recorded and its
    response closed when it arrives (a blocking socket read cannot be cancelled).
    """

    delay = control.hedge_delay()
    executor = transport.hedge_executor() if delay is not None else None
    if executor is None:
        return attempt, _send_sync(transport, send, control, attempt, trace)

    def send_in_pool(one: Attempt) -> Outcome:
        transport.hedge_threads_busy += 1
        try:
            return _send_sync(transport, send, control, one, trace, one is not attempt)
        finally:
            transport.hedge_threads_busy -= 1

    racers = {executor.submit(send_in_pool, attempt): attempt}
    done, _ = futures.wait(racers, timeout=delay)
    if not done:
        backup = control.hedge(attempt)
        if backup is not None:
            if trace is not None:
                trace.hedge(backup)
            racers[executor.submit(send_in_pool, backup)] = backup
    pending = set(racers)
    while True:
        done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
        for future in done:
            outcome = future.result()
            if _good(outcome) or not pending:
                for loser in pending:
                    loser.add_done_callback(functools.partial(_settle_sync, control, racers))
                return racers[future], outcome
            control.settle(racers[future], *_status_and_error(outcome))
            _close_sync(outcome)


def _send_sync(
    transport: MeshTransport,
    send: _Send,
    control: CallControl,
    attempt: Attempt,
    trace: ClientTrace | None = None,
    hedge: bool = False,
) -> Outcome:
    if control.timed:
        control.started(attempt)
    headers = _attempt_headers(send.headers, attempt)
    span = None
    if trace is not None:
        headers, span = trace.attempt(
            headers, attempt.endpoint, attempt.number, attempt.timeout, hedge
        )
    try:
        response = transport._send(
            send.request,
            attempt.endpoint,
            send.target,
            headers,
            attempt.timeout,
            send.body,
            send.tls,
        )
    except httpx.TransportError as exc:
        if span is not None:
            end_attempt(span, None, exc)
        return exc
    except BaseException as exc:
        if span is not None:
            end_attempt(span, None, exc)
        raise
    if span is not None:
        end_attempt(span, response.status_code, None)
    return response


async def _send_async(
    transport: AsyncMeshTransport,
    send: _Send,
    control: CallControl,
    attempt: Attempt,
    trace: ClientTrace | None = None,
    hedge: bool = False,
) -> Outcome:
    if control.timed:
        control.started(attempt)
    headers = _attempt_headers(send.headers, attempt)
    span = None
    if trace is not None:
        headers, span = trace.attempt(
            headers, attempt.endpoint, attempt.number, attempt.timeout, hedge
        )
    try:
        response = await transport._send(
            send.request,
            attempt.endpoint,
            send.target,
            headers,
            attempt.timeout,
            send.body,
            send.tls,
        )
    except httpx.TransportError as exc:
        if span is not None:
            end_attempt(span, None, exc)
        return exc
    except BaseException as exc:  # a hedge that lost is cancelled here
        if span is not None:
            end_attempt(span, None, exc)
        raise
    if span is not None:
        end_attempt(span, response.status_code, None)
    return response


async def _race_async(
    transport: AsyncMeshTransport,
    send: _Send,
    control: CallControl,
    attempt: Attempt,
    trace: ClientTrace | None,
) -> tuple[Attempt, Outcome]:
    """The async twin of _race_sync; the loser is cancelled."""

    delay = control.hedge_delay()
    if delay is None:
        return attempt, await _send_async(transport, send, control, attempt, trace)

    def send_one(one: Attempt) -> Awaitable[Outcome]:
        return _send_async(transport, send, control, one, trace, one is not attempt)

    racers = {asyncio.ensure_future(send_one(attempt)): attempt}
    done, _ = await asyncio.wait(racers, timeout=delay)
    if not done:
        backup = control.hedge(attempt)
        if backup is not None:
            if trace is not None:
                trace.hedge(backup)
            racers[asyncio.ensure_future(send_one(backup))] = backup
    pending = set(racers)
    handled: set[asyncio.Future[Outcome]] = set()
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                handled.add(task)
                outcome = task.result()
                if _good(outcome) or not pending:
                    return racers[task], outcome
                control.settle(racers[task], *_status_and_error(outcome))
                if isinstance(outcome, httpx.Response):
                    await outcome.aclose()
    finally:
        for task in racers:
            if task in handled:
                continue
            if not task.done():
                task.cancel()  # its send releases the endpoint's in-flight slot
                continue
            if task.cancelled():
                continue
            late = task.result()  # finished in the same instant as the winner
            control.settle(racers[task], *_status_and_error(late))
            if isinstance(late, httpx.Response):
                await late.aclose()


def _status_and_error(outcome: Outcome) -> tuple[int | None, BaseException | None]:
    if isinstance(outcome, httpx.Response):
        return outcome.status_code, None
    return None, outcome


def _close_sync(outcome: Outcome) -> None:
    if isinstance(outcome, httpx.Response):
        outcome.close()


def _settle_sync(
    control: CallControl,
    racers: dict[futures.Future[Outcome], Attempt],
    future: futures.Future[Outcome],
) -> None:
    outcome = future.result()
    control.settle(racers[future], *_status_and_error(outcome))
    _close_sync(outcome)


def _overflow(control: CallControl) -> str:
    return (
        f"concurrency limit of {control.service!r} reached (limits.max_requests and "
        "max_pending are full); the call was rejected instead of queued"
    )
