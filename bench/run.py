"""meshlib benchmark: the mesh's clients against plain httpx/aiohttp, same process.

Usage::

    .venv/bin/python bench/run.py          # full run, ~2 min: bench/results/latest.json
    .venv/bin/python bench/run.py --quick  # smoke run, ~21 s: bench/results/quick.json

One uvicorn server (bench/server.py: uvloop + httptools, answers 200 ``ok``)
runs in a subprocess on an ephemeral loopback port, so its CPU is not counted
in this process. Every comparison is paired: the clients being compared run
in the same process, interleaved in rounds with their order alternating, so
that the machine's noise hits them alike; the report gives medians over rounds
and per-round differences and ratios. A second mesh, ``mesh_resilience``, has
the same routes plus a full resilience policy (timeout, retries, breakers,
outlier detection, limits, rate limit), so that its difference from ``mesh``
is what the resilience layer costs a successful request. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import gc
import http.client
import importlib.metadata
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from meshlib import Mesh
from meshlib.balancing import make_balancer
from meshlib.endpoint import Endpoint
from meshlib.http.plan import plan_request
from meshlib.http.resilient import run_sync
from meshlib.resilience import fastlane
from meshlib.resilience.attempts import CallControl
from meshlib.routing.decide import decide, find_route, pick_cluster, pick_endpoint
from meshlib.routing.request import RequestView

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SERVICE = "bench"
MESH_URL = f"http://{SERVICE}/"
CONCURRENCY = 16
LB_ENDPOINTS = 10
LB_POLICIES = ("round_robin", "random", "least_request", "ring_hash")

# The targets of the performance budget (/work/shared/DESIGN.md, docs/benchmarks.md).
TARGET_DECISION_US = 15.0
TARGET_SYNC_P50_DELTA_US = 25.0
TARGET_ASYNC_RATIO = 5.0
TARGET_RESILIENCE_CPU_US = 10.0  # what the resilience layer may add per successful request
SIDECAR_HOP_P50_US = 110.0  # one HAProxy sidecar hop on this machine class (notes)
# The clients of the sync and async comparisons, as they are printed.
LABELS = {"mesh_resilience": "mesh+resilience"}
# CPU used by other processes during a phase, in CPUs (0.1 = 10 % of one vCPU on
# average): above this the phase shared the machine and its figures are suspect.
BUSY_OTHER_CPUS = 0.1


@dataclass(frozen=True)
class Settings:
    mode: str
    sync_rounds: int
    sync_requests: int  # per client per round
    sync_warmup: int
    sync_in_situ: int  # run_sync calls timed after a real request (cold caches)
    async_rounds: int
    async_seconds: float  # per client per round
    async_max_requests: int  # bound on one block, whatever the speed
    async_warmup: int
    timeit_repeat: int
    timeit_calls: int  # calls per repeat for sub-µs cases; slower cases use 1/5 or 1/10


FULL = Settings(
    mode="full",
    sync_rounds=9,
    sync_requests=4000,
    sync_warmup=500,
    sync_in_situ=4000,
    async_rounds=5,
    async_seconds=3.0,
    async_max_requests=200_000,
    async_warmup=300,
    timeit_repeat=7,
    timeit_calls=200_000,
)
QUICK = Settings(
    mode="quick",
    sync_rounds=3,
    sync_requests=800,
    sync_warmup=200,
    sync_in_situ=1000,
    async_rounds=3,
    async_seconds=1.0,
    async_max_requests=50_000,
    async_warmup=100,
    timeit_repeat=5,
    timeit_calls=50_000,
)


# -- the server ------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


@contextmanager
def bench_server(timeout: float = 15.0) -> Iterator[Server]:
    """Start bench/server.py in its own process group; kill the group on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    process: subprocess.Popen[bytes] | None = None
    try:
        process = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "server.py"), "--fd", str(sock.fileno())],
            pass_fds=(sock.fileno(),),
            start_new_session=True,  # its own process group, killed as a whole below
        )
        sock.close()  # the child holds the listening socket now
        deadline = time.monotonic() + timeout
        while not _ready(port):
            if process.poll() is not None:
                raise RuntimeError(f"bench server exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench server not ready after {timeout:.0f} s")
            time.sleep(0.05)
        yield Server(process, port)
    finally:
        sock.close()
        if process is not None:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)  # pgid == pid: start_new_session
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- other load on the machine ---------------------------------------------------------


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc (0.0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _system_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        line = Path("/proc/stat").read_text().splitlines()[0]
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in line.split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


@contextmanager
def other_load(server_pid: int, into: dict[str, Any]) -> Iterator[None]:
    """Record in ``into`` how much CPU processes other than this one and the
    server used during the block (Linux; zeros elsewhere), and the hypervisor's
    steal time."""
    busy0, steal0 = _system_cpu_s()
    own0 = time.process_time() + _proc_cpu_s(server_pid)
    wall0 = time.perf_counter()
    try:
        yield
    finally:
        busy1, steal1 = _system_cpu_s()
        own1 = time.process_time() + _proc_cpu_s(server_pid)
        wall = time.perf_counter() - wall0
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        into["other_load"] = {
            "wall_s": wall,
            "other_cpu_s": other,
            "other_cpus": other / wall if wall else 0.0,
            "steal_s": steal1 - steal0,
        }


# -- the policy ------------------------------------------------------------------------


def bench_policy(port: int) -> dict[str, Any]:
    """Service ``bench``: five routes (the last one matches a plain ``GET /``), a
    90/10 split over two subsets; every endpoint is the one bench server."""
    address = f"127.0.0.1:{port}"
    return {
        "services": {
            SERVICE: {
                "endpoints": [
                    {"address": address, "labels": {"version": "v1"}},
                    {"address": address, "labels": {"version": "v2"}},
                ],
                "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
                "routes": [
                    {
                        "name": "canary-header",
                        "match": {"headers": {"x-canary": {"exact": "1"}}},
                        "to": [{"subset": "v2"}],
                    },
                    {
                        "name": "admin",
                        "match": {
                            "path": {"prefix": "/admin/"},
                            "headers": {"x-role": {"exact": "admin"}},
                        },
                        "to": [{"subset": "v1"}],
                    },
                    {
                        "name": "reports-api",
                        "match": {
                            "path": {"regex": "/api/v[0-9]+/reports/.*"},
                            "method": ["POST", "PUT"],
                        },
                        "to": [{"subset": "v1"}],
                    },
                    {
                        "name": "debug",
                        "match": {
                            "path": {"prefix": "/debug"},
                            "headers": {"x-debug": {"present": True}},
                        },
                        "to": [{"subset": "v2"}],
                    },
                    {
                        "name": "default",
                        "match": {"path": {"prefix": "/"}},
                        "to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
                    },
                ],
            }
        }
    }


# The resilience policy of the ``mesh_resilience`` variant: every block enabled, with
# values a real service would use; none of them ever triggers against the bench server.
RESILIENCE_SERVICE: dict[str, Any] = {
    "timeout": "2s",
    "retries": {
        "attempts": 3,
        "per_try_timeout": "500ms",
        "on": ["5xx", "connect-failure", "reset"],
    },  # default budget: 20 % of requests + 10 retries/s
    "circuit_breaker": {},  # per endpoint and per service, 5 consecutive failures
    "outlier_detection": {},  # consecutive 5xx / gateway / connect failures
    "limits": {"max_requests": 1000},
}
RESILIENCE_ROUTE_RATE_LIMIT: dict[str, Any] = {"requests_per_second": 1e9}  # never triggers


def resilience_policy(port: int) -> dict[str, Any]:
    """``bench_policy`` plus the full resilience policy on service ``bench``; the route
    that the bench request matches (the last one) also gets a rate limit."""
    policy = copy.deepcopy(bench_policy(port))
    service = policy["services"][SERVICE]
    service.update(copy.deepcopy(RESILIENCE_SERVICE))
    service["routes"][-1]["rate_limit"] = dict(RESILIENCE_ROUTE_RATE_LIMIT)
    return policy


# -- statistics ------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], q: int) -> float:
    """Nearest-rank percentile (``q`` in whole percent) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, (q * len(sorted_values) + 99) // 100)  # ceil(q/100 * n), exact
    return float(sorted_values[rank - 1])


@dataclass
class Block:
    """One client's run in one round."""

    requests: int
    wall_s: float
    cpu_s: float
    latencies_ns: list[int]

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies_ns)
        return {
            "p50_us": percentile(lat, 50) / 1e3,
            "p99_us": percentile(lat, 99) / 1e3,
            "cpu_us": self.cpu_s / self.requests * 1e6,
            "rps": self.requests / self.wall_s,
        }


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def aggregate(rounds: list[dict[str, dict[str, float]]], names: Sequence[str]) -> dict[str, Any]:
    """Median over rounds of every metric of every client; the rounds themselves too."""
    out: dict[str, Any] = {}
    for name in names:
        metrics = rounds[0][name].keys()
        out[name] = {m: med([r[name][m] for r in rounds]) for m in metrics}
    out["rounds"] = rounds
    return out


def paired_delta(
    rounds: list[dict[str, dict[str, float]]], a: str, b: str, metrics: Sequence[str]
) -> dict[str, Any]:
    """``a - b``: the median of the per-round differences of each metric, and the
    per-round differences themselves (``<metric>_rounds``)."""
    out: dict[str, Any] = {}
    for m in metrics:
        diffs = [r[a][m] - r[b][m] for r in rounds]
        out[m] = med(diffs)
        out[f"{m}_rounds"] = diffs
    return out


def rotated(names: Sequence[str], r: int) -> list[str]:
    """The client order of round ``r``: rotated by one each round and reversed every
    other round, so that over ``2 * len(names)`` rounds each client runs in each
    position, before and after each other client, alike."""
    shift = r % len(names)
    order = list(names[shift:]) + list(names[:shift])
    if r % 2:
        order.reverse()
    return order


# -- 1. sync ---------------------------------------------------------------------------


def sync_block(client: httpx.Client, url: str, n: int) -> Block:
    latencies = [0] * n
    get = client.get
    clock = time.perf_counter_ns
    gc.collect()
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for i in range(n):
        t0 = clock()
        response = get(url)
        latencies[i] = clock() - t0
        if response.status_code != 200:
            raise RuntimeError(f"{url}: status {response.status_code}")
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return Block(n, wall, cpu, latencies)


def bench_sync(mesh: Mesh, resilient: Mesh, port: int, s: Settings) -> dict[str, Any]:
    raw_url = f"http://127.0.0.1:{port}/"
    with (
        httpx.Client(trust_env=False) as raw,
        mesh.http_client() as meshed,
        resilient.http_client() as meshed_resilient,
    ):
        clients: dict[str, tuple[httpx.Client, str]] = {
            "raw_httpx": (raw, raw_url),
            "mesh": (meshed, MESH_URL),
            "mesh_resilience": (meshed_resilient, MESH_URL),
        }
        for client, url in clients.values():
            sync_block(client, url, s.sync_warmup)
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(s.sync_rounds):
            order = rotated(list(clients), r)
            result = {}
            for name in order:
                client, url = clients[name]
                result[name] = sync_block(client, url, s.sync_requests).summary()
            rounds.append(result)
            print(
                f"  sync round {r + 1}/{s.sync_rounds}: "
                + ", ".join(f"{n} p50 {result[n]['p50_us']:.0f} µs" for n in clients),
                flush=True,
            )
    out = aggregate(rounds, list(clients))
    out["delta_p50_us"] = med([r["mesh"]["p50_us"] - r["raw_httpx"]["p50_us"] for r in rounds])
    out["delta_p99_us"] = med([r["mesh"]["p99_us"] - r["raw_httpx"]["p99_us"] for r in rounds])
    out["delta_cpu_us"] = med([r["mesh"]["cpu_us"] - r["raw_httpx"]["cpu_us"] for r in rounds])
    metrics = ("p50_us", "p99_us", "cpu_us")
    # the resilience layer alone, and mesh+resilience against no mesh at all
    out["resilience_vs_mesh"] = paired_delta(rounds, "mesh_resilience", "mesh", metrics)
    out["resilience_vs_raw"] = paired_delta(rounds, "mesh_resilience", "raw_httpx", metrics)
    out["requests_per_round"] = s.sync_requests
    with mesh.http_client() as meshed:
        out["run_sync_no_io_in_situ"] = run_sync_in_situ(meshed, resilient, s.sync_in_situ)
    return out


def run_sync_in_situ(meshed: httpx.Client, resilient: Mesh, n: int) -> dict[str, Any]:
    """The resilience layer's own work, timed where it runs: ``run_sync`` around a
    send that returns a canned 200 (as in the decision path), once right after each
    of ``n`` real mesh requests, whose ~250 µs of httpx, httpcore and kernel work
    leave the CPU caches cold, and ``n`` times back to back (hot, as timeit sees
    it). µs per call, medians; the clock's own cost is subtracted."""
    with httpx.Client(trust_env=False) as client:
        request = client.build_request("GET", MESH_URL)
    rng = random.Random(4)
    plan = plan_request(resilient.snapshot, request, rng)
    if plan is None or not plan.resilient:
        raise RuntimeError("the resilient mesh should send the bench request through run_sync")
    fake: Any = _NoIOTransport(rng, httpx.Response(200))
    clock = time.perf_counter_ns
    get = meshed.get
    empty = med([-(clock() - clock()) for _ in range(1000)])
    hot = [0] * n
    cold = [0] * n
    gc.collect()
    for i in range(n):
        t0 = clock()
        run_sync(fake, request, plan)
        hot[i] = clock() - t0
    for i in range(n):
        get(MESH_URL)
        t0 = clock()
        run_sync(fake, request, plan)
        cold[i] = clock() - t0
    return {
        "after_request_us": (med(cold) - empty) / 1e3,
        "back_to_back_us": (med(hot) - empty) / 1e3,
        "calls": n,
    }


# -- 2. async --------------------------------------------------------------------------

Send = Callable[[], Awaitable[None]]


async def async_block(send: Send, seconds: float, cap: int, concurrency: int) -> Block:
    latencies: list[int] = []
    clock = time.perf_counter_ns
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while len(latencies) < cap and time.perf_counter() < deadline:
            t0 = clock()
            await send()
            latencies.append(clock() - t0)

    gc.collect()
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return Block(len(latencies), wall, cpu, latencies)


def _httpx_sender(client: httpx.AsyncClient, url: str) -> Send:
    async def send() -> None:
        response = await client.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: status {response.status_code}")

    return send


def _aiohttp_sender(session: aiohttp.ClientSession, url: str) -> Send:
    async def send() -> None:
        async with session.get(url) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url}: status {response.status}")

    return send


def _transport_sender(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> Send:
    """The mesh transport alone, without httpx.AsyncClient around it (diagnostic row)."""

    async def send() -> None:
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise RuntimeError(f"{request.url}: status {response.status_code}")

    return send


async def _bench_async(mesh: Mesh, resilient: Mesh, port: int, s: Settings) -> dict[str, Any]:
    raw_url = f"http://127.0.0.1:{port}/"
    async with (
        httpx.AsyncClient(trust_env=False) as default,
        mesh.async_http_client() as meshed,
        resilient.async_http_client() as meshed_resilient,
        aiohttp.ClientSession() as session,
        mesh.async_transport() as transport,
    ):
        senders: dict[str, Send] = {
            "httpx_default": _httpx_sender(default, raw_url),
            "mesh": _httpx_sender(meshed, MESH_URL),
            "mesh_resilience": _httpx_sender(meshed_resilient, MESH_URL),
            "aiohttp": _aiohttp_sender(session, raw_url),
            # a GET has no body, so one prebuilt request can be sent by every worker
            "mesh_transport_only": _transport_sender(
                transport, meshed.build_request("GET", MESH_URL)
            ),
        }
        for send in senders.values():
            await async_block(send, 60.0, s.async_warmup, CONCURRENCY)
        names = list(senders)
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(s.async_rounds):
            order = rotated(names, r)
            result = {}
            for name in order:
                block = await async_block(
                    senders[name], s.async_seconds, s.async_max_requests, CONCURRENCY
                )
                result[name] = block.summary()
            rounds.append(result)
            print(
                f"  async round {r + 1}/{s.async_rounds}: "
                + ", ".join(f"{n} {result[n]['rps']:.0f} req/s" for n in names),
                flush=True,
            )
    out = aggregate(rounds, names)
    out["ratio_mesh_vs_default"] = med(
        [r["mesh"]["rps"] / r["httpx_default"]["rps"] for r in rounds]
    )
    out["ratio_mesh_vs_aiohttp"] = med([r["mesh"]["rps"] / r["aiohttp"]["rps"] for r in rounds])
    out["ratio_mesh_resilience_vs_default"] = med(
        [r["mesh_resilience"]["rps"] / r["httpx_default"]["rps"] for r in rounds]
    )
    out["ratio_mesh_resilience_vs_mesh"] = med(
        [r["mesh_resilience"]["rps"] / r["mesh"]["rps"] for r in rounds]
    )
    metrics = ("p50_us", "p99_us", "cpu_us")
    out["resilience_vs_mesh"] = paired_delta(rounds, "mesh_resilience", "mesh", metrics)
    out["resilience_vs_default"] = paired_delta(rounds, "mesh_resilience", "httpx_default", metrics)
    out["concurrency"] = CONCURRENCY
    out["seconds_per_block"] = s.async_seconds
    return out


def bench_async(mesh: Mesh, resilient: Mesh, port: int, s: Settings) -> dict[str, Any]:
    return asyncio.run(_bench_async(mesh, resilient, port, s))


# -- 3. decision path ------------------------------------------------------------------


def time_call(stmt: str, namespace: dict[str, Any], number: int, repeat: int) -> dict[str, float]:
    """µs per call: best and median of ``repeat`` timeit runs of ``number`` calls."""
    timer = timeit.Timer(stmt, globals=namespace)
    timer.timeit(max(1, number // 10))  # warm up
    runs = [t / number * 1e6 for t in timer.repeat(repeat=repeat, number=number)]
    return {"best_us": min(runs), "median_us": med(runs), "calls": number}


def lb_endpoints() -> tuple[Endpoint, ...]:
    return tuple(Endpoint(host=f"10.0.0.{i + 1}", port=8080) for i in range(LB_ENDPOINTS))


def bench_decision(mesh: Mesh, resilient: Mesh, s: Settings) -> dict[str, Any]:
    snapshot = mesh.snapshot
    service = snapshot.services[SERVICE]
    with httpx.Client(trust_env=False) as client:
        request = client.build_request("GET", MESH_URL)  # the headers a client really sends
    raw_path = request.url.raw_path.decode("ascii")
    path, _, query = raw_path.partition("?")
    view = RequestView(request.method, path or "/", query, request.headers)
    default = service.routes[-1]
    if find_route(service, view) is not default:
        raise RuntimeError("the bench request should match the last route")
    ns: dict[str, Any] = {
        "plan_request": plan_request,
        "decide": decide,
        "find_route": find_route,
        "pick_cluster": pick_cluster,
        "pick_endpoint": pick_endpoint,
        "RequestView": RequestView,
        "snapshot": snapshot,
        "service": service,
        "request": request,
        "view": view,
        "split": default.action.split,
        "cluster": default.action.split.clusters[0],
        "rng": random.Random(1),
    }
    n = s.timeit_calls
    r = s.timeit_repeat
    cases: dict[str, tuple[str, int]] = {
        "plan_request": ("plan_request(snapshot, request, rng)", n // 10),
        "decide": ("decide(service, view, rng)", n // 5),
        "request_view": (
            "p = request.url.raw_path.decode('ascii').partition('?'); "
            "RequestView(request.method, p[0] or '/', p[2], request.headers)",
            n // 5,
        ),
        "route_match_5_routes": ("find_route(service, view)", n),
        "split_pick_90_10": ("pick_cluster(split, rng)", n),
        "endpoint_pick_in_route": ("pick_endpoint(cluster, view, rng)", n),
        "timeit_loop_overhead": ("pass", n),
    }
    results = {name: time_call(stmt, ns, number, r) for name, (stmt, number) in cases.items()}
    lb: dict[str, dict[str, float]] = {}
    for policy in LB_POLICIES:
        # what a cluster holds: the policy's balancer inside PriorityFailover
        balancer = make_balancer(policy, lb_endpoints())
        lb_ns = {"pick": balancer.pick, "rng": random.Random(2), "key": b"user-4242"}
        if policy == "ring_hash":
            lb[f"{policy}_keyed"] = time_call("pick(rng, key)", lb_ns, n, r)
            lb[f"{policy}_no_key"] = time_call("pick(rng)", lb_ns, n, r)
        else:
            lb[policy] = time_call("pick(rng)", lb_ns, n, r)
    return {
        "calls": results,
        "lb_pick_10_endpoints": lb,
        "resilience": bench_resilience_decision(resilient, s),
    }


class _NoIOTransport:
    """Stands in for MeshTransport in ``run_sync``: every send returns one canned 200,
    so that the timing is the attempt loop and CallControl alone."""

    _caller_name = None

    def __init__(self, rng: random.Random, response: httpx.Response) -> None:
        self._rng = rng
        self._response = response

    def _send(
        self,
        request: httpx.Request,
        endpoint: Endpoint,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        timeout: float | None,
        content: bytes | None = None,
        tls: str | None = None,
    ) -> httpx.Response:
        return self._response


def resilience_guard_10_hosts() -> Any:
    """A ServiceGuard with the bench resilience blocks over 10 distinct endpoints (no
    I/O: only its ``unavailable()`` is timed)."""
    service = copy.deepcopy(RESILIENCE_SERVICE)
    service["endpoints"] = [{"address": f"10.0.0.{i + 1}:8080"} for i in range(LB_ENDPOINTS)]
    with Mesh({"services": {"ten": service}}) as ten:
        guard = ten.snapshot.clusters["ten"].guard
    if guard is None:
        raise RuntimeError("the 10-host service should have a guard")
    return guard


def bench_resilience_decision(resilient: Mesh, s: Settings) -> dict[str, Any]:
    """What the resilience layer does for one successful request, without I/O: the
    CallControl protocol of a call whose first attempt answers 200, its parts, the
    whole sync attempt loop (``run_sync``) around a send that returns at once, and the
    guard's ``unavailable()`` (called on retries and when a breaker refuses)."""
    snapshot = resilient.snapshot
    with httpx.Client(trust_env=False) as client:
        request = client.build_request("GET", MESH_URL)
    rng = random.Random(3)
    plan = plan_request(snapshot, request, rng)
    if plan is None or not plan.resilient:
        raise RuntimeError("the resilient mesh should send the bench request through run_sync")
    decision = plan.decision
    policy = decision.route.action.policy
    guard = decision.cluster.guard
    if (
        policy is None
        or policy.retry is None
        or policy.budget is None
        or policy.rate_limit is None
        or guard is None
        or None in (guard.breakers, guard.cluster_breaker, guard.outlier, guard.bulkhead)
    ):
        raise RuntimeError("the resilient mesh lacks part of its resilience policy")
    cluster = decision.cluster
    path, _, query = decision.target.partition("?")
    view = RequestView(request.method, path, query, request.headers)

    def pick(avoid: frozenset[str]) -> Endpoint:  # what resilient._prepare passes (as _Send.pick)
        return pick_endpoint(cluster, view, rng, avoid)

    new_control = (
        "CallControl(service_name, policy, guard, pick, method='GET', replayable=True, "
        "clock=monotonic, rng=rng)"
    )
    ns: dict[str, Any] = {
        "CallControl": CallControl,
        "run_sync": run_sync,
        "plan_request": plan_request,
        "service_name": decision.service.name,
        "policy": policy,
        "guard": guard,
        "guard10": resilience_guard_10_hosts(),
        "pick": pick,
        "endpoint": decision.endpoint,
        "address": decision.endpoint.address,
        "lane": decision.route.action.lanes[decision.cluster.name],
        "fastlane": fastlane,
        "monotonic": time.monotonic,
        "rng": rng,
        "request": request,
        "snapshot": snapshot,
        "plan": plan,
        "fake": _NoIOTransport(rng, httpx.Response(200)),
    }
    # one call's control and first attempt, for timing the parts one by one
    control = CallControl(
        decision.service.name,
        policy,
        guard,
        pick,
        method="GET",
        replayable=True,
        clock=time.monotonic,
        rng=rng,
    )
    ns["control"] = control
    ns["attempt"] = control.first(decision.endpoint)
    n = s.timeit_calls
    r = s.timeit_repeat
    cases: dict[str, tuple[str, int]] = {
        # the protocol of one successful call, as the drivers run it
        "call_control_success": (
            f"c = {new_control}; c.admit(); a = c.first(endpoint); c.on_status(a, 200); c.finish()",
            n // 10,
        ),
        "call_control_init": (new_control, n // 5),
        "admit": ("control.admit(); control.finish()", n // 5),  # finish frees the slot
        "first": ("control.first(endpoint)", n // 5),
        "on_status_200": ("control.on_status(attempt, 200)", n // 5),
        "finish": ("control.finish()", n),
        # the fast lane that run_sync takes for a first attempt: admit, then settle a 200
        "fast_lane": (
            "fastlane.settle(lane, address, 200) "
            "if fastlane.enter(lane, address, monotonic()) else None",
            n // 5,
        ),
        # everything resilient.run_sync does around one send that answers 200
        "run_sync_no_io": ("run_sync(fake, request, plan)", n // 10),
        "plan_request_resilient": ("plan_request(snapshot, request, rng)", n // 10),
        "guard_unavailable_cached": ("guard.unavailable()", n),
        "guard_unavailable_recomputed": ("guard.invalidate(); guard.unavailable()", n // 5),
        "guard_unavailable_recomputed_10_hosts": (
            "guard10.invalidate(); guard10.unavailable()",
            n // 10,
        ),
    }
    return {name: time_call(stmt, ns, number, r) for name, (stmt, number) in cases.items()}


# -- report ----------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("meshlib", "httpx", "httpcore", "aiohttp", "uvicorn", "uvloop", "httptools"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "absent"
    return out


def verdicts(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if "decision" in result:
        decision = result["decision"]["calls"]["plan_request"]["median_us"]
        out["decision_path"] = {
            "target": f"<= {TARGET_DECISION_US:g} µs",
            "measured": round(decision, 2),
            "met": decision <= TARGET_DECISION_US,
        }
    if "sync" in result:
        delta = result["sync"]["delta_p50_us"]
        out["sync_p50_delta"] = {
            "target": f"<= {TARGET_SYNC_P50_DELTA_US:g} µs",
            "measured": round(delta, 1),
            "met": delta <= TARGET_SYNC_P50_DELTA_US,
        }
    if "async" in result:
        ratio = result["async"]["ratio_mesh_vs_default"]
        out["async_throughput_ratio"] = {
            "target": f">= {TARGET_ASYNC_RATIO:g}x",
            "measured": round(ratio, 2),
            "met": ratio >= TARGET_ASYNC_RATIO,
        }
    # The resilience layer per successful request: its own CPU without I/O (precise),
    # and the paired end-to-end CPU differences mesh+resilience - mesh (noisier, but
    # they include what the layer changes on the wire: two headers, the timeouts).
    resilience: list[tuple[str, float | None]] = [
        (
            "resilience_no_io",
            result["decision"]["resilience"]["run_sync_no_io"]["median_us"]
            if "decision" in result
            else None,
        ),
        (
            "resilience_sync_cpu",
            result["sync"]["resilience_vs_mesh"]["cpu_us"] if "sync" in result else None,
        ),
        (
            "resilience_async_cpu",
            result["async"]["resilience_vs_mesh"]["cpu_us"] if "async" in result else None,
        ),
    ]
    for name, value in resilience:
        if value is not None:
            out[name] = {
                "target": f"<= {TARGET_RESILIENCE_CPU_US:g} µs",
                "measured": round(value, 2),
                "met": value <= TARGET_RESILIENCE_CPU_US,
            }
    return out


def label(name: str) -> str:
    return LABELS.get(name, name)


def print_sync(sync: dict[str, Any], rounds: int) -> None:
    print(
        f"\n== 1. sync, sequential keep-alive ({rounds} rounds x "
        f"{sync['requests_per_round']} requests per client; medians over rounds)"
    )
    print(f"{'client':<24}{'p50 µs':>10}{'p99 µs':>10}{'CPU µs/req':>12}{'req/s':>10}")
    for name in ("raw_httpx", "mesh", "mesh_resilience"):
        m = sync[name]
        print(
            f"{label(name):<24}{m['p50_us']:>10.1f}{m['p99_us']:>10.1f}{m['cpu_us']:>12.1f}"
            f"{m['rps']:>10.0f}"
        )
    print("medians of the per-round differences:")
    print(
        f"{'mesh - raw':<24}{sync['delta_p50_us']:>+10.1f}{sync['delta_p99_us']:>+10.1f}"
        f"{sync['delta_cpu_us']:>+12.1f}"
    )
    for key, text in (
        ("resilience_vs_mesh", "mesh+resilience - mesh"),
        ("resilience_vs_raw", "mesh+resilience - raw"),
    ):
        d = sync[key]
        print(f"{text:<24}{d['p50_us']:>+10.1f}{d['p99_us']:>+10.1f}{d['cpu_us']:>+12.1f}")
    situ = sync["run_sync_no_io_in_situ"]
    print(
        f"run_sync without I/O (the layer's own work), median of {situ['calls']} calls: "
        f"{situ['after_request_us']:.2f} µs right after a real request, "
        f"{situ['back_to_back_us']:.2f} µs back to back"
    )


def print_async(a: dict[str, Any], rounds: int) -> None:
    print(
        f"\n== 2. async, concurrency {a['concurrency']} ({rounds} rounds x "
        f"{a['seconds_per_block']:g} s per client; medians over rounds)"
    )
    print(f"{'client':<24}{'req/s':>10}{'p50 µs':>10}{'p99 µs':>10}{'CPU µs/req':>12}")
    for name in ("httpx_default", "mesh", "mesh_resilience", "aiohttp", "mesh_transport_only"):
        m = a[name]
        print(
            f"{label(name):<24}{m['rps']:>10.0f}{m['p50_us']:>10.0f}{m['p99_us']:>10.0f}"
            f"{m['cpu_us']:>12.1f}"
        )
    print("medians of the per-round differences:")
    for key, text in (
        ("resilience_vs_mesh", "mesh+resilience - mesh"),
        ("resilience_vs_default", "mesh+resilience - dflt"),
    ):
        d = a[key]
        print(f"{text:<24}{'':>10}{d['p50_us']:>+10.0f}{d['p99_us']:>+10.0f}{d['cpu_us']:>+12.1f}")
    print(
        f"mesh / httpx default: {a['ratio_mesh_vs_default']:.2f}x   "
        f"mesh / raw aiohttp: {a['ratio_mesh_vs_aiohttp']:.2f}x   "
        f"mesh+resilience / httpx default: {a['ratio_mesh_resilience_vs_default']:.2f}x   "
        f"mesh+resilience / mesh: {a['ratio_mesh_resilience_vs_mesh']:.3f}x   "
        "(medians of per-round ratios)"
    )


def print_decision(d: dict[str, Any]) -> None:
    print("\n== 3. decision path, no I/O (µs per call: median, best of the repeats)")
    for name, m in d["calls"].items():
        print(f"{name:<28}{m['median_us']:>8.2f}{m['best_us']:>8.2f}")
    print(f"LB pick, {LB_ENDPOINTS} endpoints:")
    for name, m in d["lb_pick_10_endpoints"].items():
        print(f"  {name:<26}{m['median_us']:>8.2f}{m['best_us']:>8.2f}")
    print("resilience, one successful call (route policy of mesh+resilience):")
    for name, m in d["resilience"].items():
        print(f"  {name:<38}{m['median_us']:>8.2f}{m['best_us']:>8.2f}")


def print_report(result: dict[str, Any]) -> None:
    settings = result["settings"]
    if "sync" in result:
        print_sync(result["sync"], settings["sync_rounds"])
    if "async" in result:
        print_async(result["async"], settings["async_rounds"])
    if "decision" in result:
        print_decision(result["decision"])
    loads = [
        f"{phase} {result[phase]['other_load']['other_cpus']:.2f}"
        f" (steal {result[phase]['other_load']['steal_s']:.1f} s)"
        for phase in ("decision", "sync", "async")
        if phase in result
    ]
    print("\nCPUs used by other processes, per phase: " + ", ".join(loads))
    print("\n== targets")
    for name, v in result["targets"].items():
        status = "met" if v["met"] else "MISSED"
        print(f"{name:<24} target {v['target']:<10} measured {v['measured']:<8} {status}")
    for phase in ("sync", "async"):
        if phase in result:
            diffs = result[phase]["resilience_vs_mesh"]["cpu_us_rounds"]
            print(
                f"{phase} CPU µs/req mesh+resilience - mesh per round: "
                + ", ".join(f"{d:+.1f}" for d in diffs)
            )
    if "sync" in result:
        sync = result["sync"]
        deltas = [r["mesh"]["p50_us"] - r["raw_httpx"]["p50_us"] for r in sync["rounds"]]
        print(
            f"sync p50 mesh - raw per round: {', '.join(f'{d:+.0f}' for d in deltas)} µs; "
            f"one sidecar hop adds ~{SIDECAR_HOP_P50_US:.0f} µs p50 on this machine class "
            f"(median delta = {sync['delta_p50_us'] / SIDECAR_HOP_P50_US:+.0%} of a hop)"
        )


def rounded(value: Any) -> Any:
    """Floats rounded (3 decimals below 10, else 1) so that the JSON stays small."""
    if isinstance(value, float):
        return round(value, 3 if abs(value) < 10 else 1)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(rounded(result), indent=1, ensure_ascii=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 40 s)")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sync", "async", "decision"])
    args = parser.parse_args(argv)
    # SIGTERM too unwinds through the finally blocks that stop the server
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    s = QUICK if args.quick else FULL
    output = args.output or RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "note": "2 vCPU shared VM, loopback; client and server share the CPUs",
            "loadavg_1m_at_start": os.getloadavg()[0],
        },
        "versions": versions(),
        "settings": asdict(s),
        "resilience_policy": {
            "service": RESILIENCE_SERVICE,
            "route_rate_limit": RESILIENCE_ROUTE_RATE_LIMIT,
        },
    }
    with bench_server() as server:
        print(f"bench server pid {server.process.pid} on 127.0.0.1:{server.port} ({s.mode} run)")
        with (
            Mesh(bench_policy(server.port), service="bench-client") as mesh,
            Mesh(resilience_policy(server.port), service="bench-client") as resilient,
        ):
            verdict = mesh.explain("GET", MESH_URL)
            print(f"mesh: GET {MESH_URL} -> route {verdict['route']!r}, split {verdict['split']}")
            phases: dict[str, Callable[[], dict[str, Any]]] = {
                "decision": lambda: bench_decision(mesh, resilient, s),
                "sync": lambda: bench_sync(mesh, resilient, server.port, s),
                "async": lambda: bench_async(mesh, resilient, server.port, s),
            }
            for phase, run in phases.items():
                if phase in args.skip:
                    continue
                print(f"{phase} ...", flush=True)
                load: dict[str, Any] = {}
                with other_load(server.process.pid, load):
                    result[phase] = run()
                result[phase].update(load)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    busy = [
        f"{phase} {result[phase]['other_load']['other_cpus']:.2f}"
        for phase in ("decision", "sync", "async")
        if phase in result and result[phase]["other_load"]["other_cpus"] > BUSY_OTHER_CPUS
    ]
    if busy:
        result["warning"] = "other processes used CPU during: " + ", ".join(busy) + " CPUs"
    result["targets"] = verdicts(result)
    print_report(result)
    if args.skip and args.output is None:
        print(f"\npartial run ({result['elapsed_s']} s): no JSON written without --output")
    else:
        write_json(result, output)
        print(f"\nwrote {output} ({result['elapsed_s']} s)")
    if "warning" in result:
        print(f"WARNING: {result['warning']}; these figures are suspect, run again")
    else:
        print("no other load detected on the machine during the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
