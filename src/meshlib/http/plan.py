"""What both httpx transports do before any I/O: decide and rewrite. Shared by
the sync and async flavours so that they cannot drift apart."""

from __future__ import annotations

import random

import httpx

from meshlib.errors import MeshError
from meshlib.resilience.deadline import INBOUND_DEADLINE
from meshlib.routing.decide import Decision, decide
from meshlib.routing.request import RequestView
from meshlib.security.peer import INBOUND_AUTHORIZATION
from meshlib.snapshot import HeaderOps, Snapshot

HOST = b"host"


class Plan:
    """One request's decision plus the bytes to put on the wire."""

    __slots__ = ("decision", "headers", "path", "resilient", "target", "timeout", "tls")

    def __init__(
        self,
        decision: Decision,
        headers: list[tuple[bytes, bytes]],
        target: bytes,
        timeout: float | None,
        resilient: bool = False,
        tls: str | None = None,
        path: str = "",
    ) -> None:
        self.decision = decision
        self.headers = headers
        self.target = target
        # the path and query the application asked for (target: after any rewrite)
        self.path = path or target.decode("ascii")
        self.timeout = timeout
        # route or service has resilience policy: the call goes through the attempt loop
        self.resilient = resilient
        # mutual TLS to this destination service (its name: the identity to expect)
        self.tls = tls


CALLER = b"x-mesh-caller"
AUTHORIZATION = b"authorization"


def plan_request(
    snapshot: Snapshot,
    request: httpx.Request,
    rng: random.Random,
    caller: bytes | None = None,
    mtls: bool = False,
) -> Plan | None:
    """The plan for a request to a mesh service, or None to pass it through untouched.

    ``caller`` (this process's service name) is sent as ``x-mesh-caller`` so the
    server can apply per-caller limits without mTLS identities. With ``mtls`` (the
    mesh has a workload identity), destinations with mutual TLS get ``Plan.tls``.
    """
    url = request.url
    service = snapshot.services.get(url.host)
    if service is None:
        return None
    if url.scheme != "http":
        raise MeshError(
            f"{url.scheme}://{url.host} names mesh service {service.name!r}: call it with "
            "http:// (the mesh picks the endpoint; mesh TLS is configured in the policy)"
        )
    raw_path = url.raw_path.decode("ascii")
    path, _, query = raw_path.partition("?")
    view = RequestView(request.method, path or "/", query, request.headers)
    decision = decide(service, view, rng)
    action = decision.route.action
    headers = request.headers.raw
    if action.header_ops is not None or action.host_rewrite is not None:
        headers = rewrite_headers(headers, action.header_ops, action.host_rewrite)
    if caller is not None:
        headers = [*headers, (CALLER, caller)]
    if service.forward_jwt:
        bearer = INBOUND_AUTHORIZATION.get()
        if bearer is not None and "authorization" not in request.headers:
            headers = [*headers, (AUTHORIZATION, bearer.encode("latin-1"))]
    resilient = (
        action.policy is not None
        or decision.cluster.guard is not None
        or INBOUND_DEADLINE.get() is not None
    )
    tls = None
    if mtls and decision.cluster.service in snapshot.peer_identities:
        tls = decision.cluster.service
    target = decision.target.encode("ascii")
    return Plan(decision, headers, target, action.timeout, resilient, tls, raw_path)


def rewrite_headers(
    raw: list[tuple[bytes, bytes]], ops: HeaderOps | None, host: str | None
) -> list[tuple[bytes, bytes]]:
    """Apply a route's header actions: remove, set (replace), add (append), host rewrite."""
    drop: set[bytes] = set()
    extra: list[tuple[bytes, bytes]] = []
    if ops is not None:
        drop.update(name.encode("latin-1") for name in ops.remove)
        for name, value in ops.set:
            drop.add(name.encode("latin-1"))
            extra.append((name.encode("latin-1"), value.encode("latin-1")))
        extra.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.add)
    out = [(name, value) for name, value in raw if name.lower() not in drop]
    if host is not None:
        out = [(HOST if name.lower() == HOST else name, value) for name, value in out]
        out = [(n, host.encode("idna") if n == HOST else v) for n, v in out]
    out.extend(extra)
    return out


def mirror_plan(plan: Plan, limit: float, tls: str | None) -> Plan:
    """The plan for a mirror copy: Host gets ``-shadow`` appended (Envoy's
    convention) and the copy never waits longer than ``limit`` seconds; ``tls`` is
    the mirror service when it is called with mutual TLS."""
    headers = [(n, v + b"-shadow" if n.lower() == HOST else v) for n, v in plan.headers]
    timeout = limit if plan.timeout is None else min(plan.timeout, limit)
    return Plan(plan.decision, headers, plan.target, timeout, tls=tls, path=plan.path)
