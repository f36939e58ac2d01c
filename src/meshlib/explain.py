"""Why a request goes where it goes: a JSON-serialisable account of each step."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import httpx

from meshlib.errors import MeshError
from meshlib.routing.decide import pick_cluster, pick_endpoint, rewrite_target
from meshlib.routing.request import RequestView
from meshlib.snapshot import Cluster, Snapshot


def explain_request(
    snapshot: Snapshot,
    method: str,
    url: str,
    headers: Mapping[str, str] | None,
    rng: random.Random,
) -> dict[str, Any]:
    """Replay the routing decision for one request, keeping every reason."""
    parsed = httpx.URL(url)
    lowered = {name.lower(): value for name, value in (headers or {}).items()}
    result: dict[str, Any] = {
        "request": {"method": method.upper(), "url": url, "headers": lowered},
        "snapshot_version": snapshot.version,
    }
    service = snapshot.services.get(parsed.host)
    if service is None:
        result["service"] = None
        result["verdict"] = f"{parsed.host!r} is not a mesh service: passed through untouched"
        return result
    result["service"] = service.name
    raw = parsed.raw_path.decode("ascii")
    path, _, query = raw.partition("?")
    view = RequestView(method.upper(), path or "/", query, lowered)
    tried = []
    matched = None
    for route in service.routes:
        reason = route.matcher.mismatch(view)
        tried.append(
            {
                "route": route.name,
                "index": route.index,
                "match": route.matcher.describe(),
                "matched": reason is None,
                **({"why_not": reason} if reason else {}),
            }
        )
        if reason is None:
            matched = route
            break
    result["routes"] = tried
    if matched is None:
        result["verdict"] = "no route matched: the request would fail with NoRouteError"
        return result
    action = matched.action
    split = action.split
    result["route"] = matched.name
    result["split"] = [
        {"cluster": c.name, "weight": w, "share": round(100.0 * w / split.total, 2)}
        for c, w in zip(split.clusters, split.weights, strict=True)
    ]
    cluster = pick_cluster(split, rng)
    result["cluster"] = cluster.name
    result["load_balancer"] = cluster.lb_policy
    result["candidates"] = _candidates(cluster)
    try:
        endpoint = pick_endpoint(cluster, view, rng)
    except MeshError as exc:
        result["endpoint"] = None
        result["verdict"] = str(exc)
        return result
    result["endpoint"] = endpoint.address
    result["upstream_target"] = rewrite_target(matched, view)
    if action.host_rewrite:
        result["host_rewrite"] = action.host_rewrite
    if action.header_ops is not None:
        ops = action.header_ops
        result["request_headers"] = {
            "set": dict(ops.set),
            "add": dict(ops.add),
            "remove": sorted(ops.remove),
        }
    if action.mirror is not None:
        result["mirror"] = {
            "cluster": action.mirror.cluster.name,
            "percent": action.mirror.fraction * 100,
        }
    result["timeout"] = action.timeout
    if action.policy is not None:
        result["resilience"] = action.policy.describe()
    if cluster.guard is not None:
        result["protection"] = cluster.guard.describe()
    prefix = f"services.{service.name}."
    result["not_enforced"] = [
        path
        for path in snapshot.not_enforced
        if path.startswith((prefix, "defaults.")) or path == "trust_domain"
    ]
    result["verdict"] = (
        f"route {matched.name!r} → cluster {cluster.name!r} → endpoint {endpoint.address}"
    )
    return result


def _candidates(cluster: Cluster) -> list[dict[str, Any]]:
    balancer = cluster.balancer
    guard = cluster.guard
    unavailable = guard.unavailable() if guard is not None else frozenset()
    active = {ep.address for ep in getattr(balancer, "endpoints", ())}
    levels = getattr(balancer, "levels", ())
    if levels:
        active = {ep.address for ep in levels[0][1].endpoints}
    out = []
    for endpoint in cluster.endpoints:
        view = endpoint.describe()
        view["eligible"] = endpoint.address in active and endpoint.address not in unavailable
        if endpoint.address in unavailable:
            view["unavailable"] = "ejected or breaker open"
        out.append(view)
    return out


def format_explanation(result: Mapping[str, Any]) -> str:
    """Human-readable rendering for the command line."""
    request = result["request"]
    lines = [f"{request['method']} {request['url']}"]
    if result.get("service") is None:
        lines.append(f"  {result['verdict']}")
        return "\n".join(lines)
    lines.append(f"  service  {result['service']} (snapshot v{result['snapshot_version']})")
    for route in result.get("routes", []):
        mark = "✓" if route["matched"] else "✗"
        why = f" — {route['why_not']}" if "why_not" in route else ""
        lines.append(f"  {mark} route {route['route']}: {route['match']}{why}")
    if "split" in result:
        shares = ", ".join(f"{s['cluster']} {s['share']}%" for s in result["split"])
        lines.append(f"  split    {shares}")
        lines.append(f"  cluster  {result['cluster']} ({result['load_balancer']})")
        for candidate in result["candidates"]:
            state = "eligible" if candidate["eligible"] else "standby"
            if not candidate["healthy"]:
                state = "unhealthy"
            elif "unavailable" in candidate:
                state = candidate["unavailable"]
            lines.append(
                f"    {candidate['address']:<22} weight {candidate['weight']:<4} "
                f"priority {candidate['priority']} {state} labels {candidate['labels']}"
            )
    if result.get("endpoint"):
        lines.append(f"  endpoint {result['endpoint']}  target {result['upstream_target']}")
    for key in ("host_rewrite", "request_headers", "mirror", "timeout", "resilience", "protection"):
        if result.get(key) is not None:
            lines.append(f"  {key:<8} {result[key]}")
    if result.get("not_enforced"):
        lines.append(f"  not enforced yet: {', '.join(result['not_enforced'])}")
    lines.append(f"  → {result['verdict']}")
    return "\n".join(lines)
