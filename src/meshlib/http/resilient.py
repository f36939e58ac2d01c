"""The attempt loops of the httpx transports: thin drivers around CallControl.

Everything that is decided (which endpoint, which limit, retry or not) is
decided by `meshlib.resilience.attempts.CallControl`; these loops only wait,
send and report. The sync and async loops mirror each other line by line.
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
from meshlib.resilience.attempts import Attempt, CallControl
from meshlib.resilience.faults import Fault, decide_fault
from meshlib.resilience.limits import Bulkhead
from meshlib.resilience.policy import NO_POLICY
from meshlib.routing.decide import pick_another
from meshlib.routing.request import RequestView

if TYPE_CHECKING:
    from meshlib.http.async_transport import AsyncMeshTransport
    from meshlib.http.sync_transport import MeshTransport

ATTEMPT_HEADER = b"x-mesh-attempt"
TIMEOUT_HEADER = b"x-mesh-timeout-ms"
FAULT_HEADER = b"x-mesh-fault"


def _control(
    plan: Plan, request: httpx.Request, rng: random.Random
) -> tuple[CallControl, bytes | None]:
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
    cluster = decision.cluster
    target = decision.target

    def pick(avoid: frozenset[str]) -> Endpoint:
        # only retries and hedges pick again: build the request view then, not per call
        path, _, query = target.partition("?")
        view = RequestView(request.method, path, query, request.headers)
        return pick_another(cluster, view, rng, avoid)

    control = CallControl(
        decision.service.name,
        policy,
        cluster.guard,
        pick,
        method=request.method,
        replayable=replayable,
        clock=time.monotonic,
        rng=rng,
    )
    return control, body


def _without_attempt_headers(plan: Plan) -> Plan:
    """Drop x-mesh-attempt / x-mesh-timeout-ms the application forwarded from its
    own inbound request: each attempt sends its own, once."""
    headers = plan.headers
    if not any(name[:8].lower() in _FORWARDED_PREFIXES for name, _ in headers):
        return plan
    kept = [(n, v) for n, v in headers if n.lower() not in (ATTEMPT_HEADER, TIMEOUT_HEADER)]
    return Plan(plan.decision, kept, plan.target, plan.timeout, plan.resilient)


def _attempt_plan(plan: Plan, attempt: Attempt) -> Plan:
    number = attempt.number
    value = _ATTEMPT_VALUES[number] if number < len(_ATTEMPT_VALUES) else b"%d" % number
    headers = [*plan.headers, (ATTEMPT_HEADER, value)]
    if attempt.timeout is not None:
        headers.append((TIMEOUT_HEADER, b"%d" % max(1, int(attempt.timeout * 1000))))
    return Plan(plan.decision, headers, plan.target, attempt.timeout)


_ATTEMPT_VALUES = [b"%d" % number for number in range(12)]
_FORWARDED_PREFIXES = (b"x-mesh-a", b"x-mesh-t")


def _fault(plan: Plan, request: httpx.Request, rng: random.Random) -> Fault | None:
    policy = plan.decision.route.action.policy
    if policy is None or policy.faults is None:
        return None
    return decide_fault(policy.faults, request.headers, rng)


def _bulkhead(control: CallControl) -> tuple[Bulkhead | None, float]:
    guard = control.guard
    if guard is None:
        return None, 0.0
    return guard.bulkhead, guard.pending_timeout


def _fault_response(status: int) -> httpx.Response:
    return httpx.Response(status, headers=[(FAULT_HEADER, b"abort")], content=b"fault injected")


def run_sync(transport: MeshTransport, request: httpx.Request, plan: Plan) -> httpx.Response:
    """Timeouts, retries, budget, breakers, limits and faults around sync sends."""
    control, body = _control(plan, request, transport._rng)
    plan = _without_attempt_headers(plan)
    control.admit()
    bulkhead, wait = _bulkhead(control)
    if bulkhead is not None and not bulkhead.enter_sync(wait):
        raise OverloadedError(_overflow(control))
    try:
        fault = _fault(plan, request, transport._rng)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.abort_status is not None:
                return _fault_response(fault.abort_status)
        attempt = control.first(plan.decision.endpoint)
        while True:
            if attempt.delay:
                time.sleep(attempt.delay)
            attempt, outcome = _race_sync(transport, request, plan, control, attempt, body)
            if not isinstance(outcome, httpx.Response):
                attempt = control.on_error(attempt, outcome)
                continue
            following = control.on_status(attempt, outcome.status_code)
            if following is None:
                return outcome
            outcome.close()
            attempt = following
    finally:
        control.finish()
        if bulkhead is not None:
            bulkhead.exit()


async def run_async(
    transport: AsyncMeshTransport, request: httpx.Request, plan: Plan
) -> httpx.Response:
    """The async twin of run_sync."""
    control, body = _control(plan, request, transport._rng)
    plan = _without_attempt_headers(plan)
    control.admit()
    bulkhead, wait = _bulkhead(control)
    if bulkhead is not None and not await bulkhead.enter_async(wait):
        raise OverloadedError(_overflow(control))
    try:
        fault = _fault(plan, request, transport._rng)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.abort_status is not None:
                return _fault_response(fault.abort_status)
        attempt = control.first(plan.decision.endpoint)
        while True:
            if attempt.delay:
                await asyncio.sleep(attempt.delay)
            attempt, outcome = await _race_async(transport, request, plan, control, attempt, body)
            if not isinstance(outcome, httpx.Response):
                attempt = control.on_error(attempt, outcome)
                continue
            following = control.on_status(attempt, outcome.status_code)
            if following is None:
                return outcome
            await outcome.aclose()
            attempt = following
    finally:
        control.finish()
        if bulkhead is not None:
            bulkhead.exit()


Outcome = httpx.Response | httpx.TransportError


def _good(outcome: Outcome) -> bool:
    return isinstance(outcome, httpx.Response) and outcome.status_code < 500


def _race_sync(
    transport: MeshTransport,
    request: httpx.Request,
    plan: Plan,
    control: CallControl,
    attempt: Attempt,
    body: bytes | None,
) -> tuple[Attempt, Outcome]:
    """Send one attempt; with hedging, race a backup after the hedge delay.

    The first good answer wins; the loser's outcome is recorded and its
    response closed when it arrives (a blocking socket read cannot be cancelled).
    """

    delay = control.hedge_delay()
    executor = transport.hedge_executor() if delay is not None else None
    if executor is None:
        return attempt, _send_sync(transport, request, plan, control, attempt, body)

    def send_in_pool(one: Attempt) -> Outcome:
        transport.hedge_threads_busy += 1
        try:
            return _send_sync(transport, request, plan, control, one, body)
        finally:
            transport.hedge_threads_busy -= 1

    racers = {executor.submit(send_in_pool, attempt): attempt}
    done, _ = futures.wait(racers, timeout=delay)
    if not done:
        backup = control.hedge(attempt)
        if backup is not None:
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
    request: httpx.Request,
    plan: Plan,
    control: CallControl,
    attempt: Attempt,
    body: bytes | None,
) -> Outcome:
    control.started(attempt)
    try:
        return transport._send(request, attempt.endpoint, _attempt_plan(plan, attempt), body)
    except httpx.TransportError as exc:
        return exc


async def _send_async(
    transport: AsyncMeshTransport,
    request: httpx.Request,
    plan: Plan,
    control: CallControl,
    attempt: Attempt,
    body: bytes | None,
) -> Outcome:
    control.started(attempt)
    try:
        return await transport._send(request, attempt.endpoint, _attempt_plan(plan, attempt), body)
    except httpx.TransportError as exc:
        return exc


async def _race_async(
    transport: AsyncMeshTransport,
    request: httpx.Request,
    plan: Plan,
    control: CallControl,
    attempt: Attempt,
    body: bytes | None,
) -> tuple[Attempt, Outcome]:
    """The async twin of _race_sync; the loser is cancelled."""

    delay = control.hedge_delay()
    if delay is None:
        return attempt, await _send_async(transport, request, plan, control, attempt, body)

    def send(one: Attempt) -> Awaitable[Outcome]:
        return _send_async(transport, request, plan, control, one, body)

    racers = {asyncio.ensure_future(send(attempt)): attempt}
    done, _ = await asyncio.wait(racers, timeout=delay)
    if not done:
        backup = control.hedge(attempt)
        if backup is not None:
            racers[asyncio.ensure_future(send(backup))] = backup
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
