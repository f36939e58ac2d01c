"""meshlib benchmark: what mutual TLS adds to a mesh request, against the same client
without TLS and against an mTLS HAProxy sidecar pair.

Usage::

    .venv/bin/python bench/mtls.py          # full run, ~1 min: bench/results/mtls.json
    .venv/bin/python bench/mtls.py --quick  # smoke run, ~10 s: bench/results/mtls-quick.json

Everything runs on 127.0.0.1, on ephemeral ports; each server and sidecar in its own
process group, killed as a group at the end; the temporary CA and certificates are
removed. A CA for trust domain ``example.org`` issues every certificate.

Servers (subprocesses):

- the bench backend: bench/server.py (uvicorn, uvloop, httptools, answers 200 ``ok``);
- two mesh servers, bench/mtls_server.py: the same app behind ``Mesh.serve`` as
  service ``bench``, one ``strict`` (mTLS, workload certificate
  ``spiffe://example.org/ns/default/sa/bench``) and one ``disabled`` (plaintext), so
  that they differ only by TLS;
- an HAProxy pair: a client sidecar (plaintext in, TLS with a client certificate out,
  server verified against the CA) in front of a server sidecar (TLS in, a client
  certificate from the CA required, plaintext out to the bench backend).

Clients (this process, sequential keep-alive GETs, paired interleaved rounds with the
order rotated, as in bench/run.py): ``direct`` (httpx -> backend), ``mesh_plain``
(mesh -> plaintext mesh server), ``mesh_mtls`` (mesh with identity -> strict mesh
server; the mesh upgrades to mTLS and checks the server's SPIFFE ID),
``haproxy_pair`` (httpx -> client sidecar -> server sidecar -> backend) and, as a
diagnostic, ``httpx_mtls`` (plain httpx with a client certificate -> strict mesh
server: the TLS without the mesh's client). The report gives medians over rounds
and medians of per-round differences, of latency, of this process's CPU and of the
CPU of the processes on each path (servers and sidecars, from /proc). A second phase
opens a new connection for every request (a fresh client each time): what a TLS
handshake costs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from httpcore._ssl import default_ssl_context

from meshlib import Mesh
from meshlib.tls.ca import CertificateAuthority
from meshlib.tls.contexts import client_context, peer_spiffe_id

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/run.py, a script beside this one
    BENCH_DIR,
    BUSY_OTHER_CPUS,
    MESH_URL,
    RESULTS_DIR,
    SERVICE,
    _proc_cpu_s,
    _ready,
    _stop,
    _system_cpu_s,
    aggregate,
    bench_server,
    med,
    paired_delta,
    percentile,
    rotated,
    sync_block,
    versions,
    write_json,
)

TRUST_DOMAIN = "example.org"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{SERVICE}"
HAPROXY = "/usr/sbin/haproxy"

CLIENTS = ("direct", "mesh_plain", "mesh_mtls", "haproxy_pair", "httpx_mtls")
LABELS = {
    "direct": "direct plaintext",
    "mesh_plain": "mesh plaintext",
    "mesh_mtls": "mesh mTLS",
    "haproxy_pair": "haproxy mTLS pair",
    "httpx_mtls": "httpx mTLS, no mesh",
}
PATHS = {
    "direct": "httpx.Client -> bench backend (plaintext)",
    "mesh_plain": "mesh http_client, no identity -> mesh server, mode disabled (plaintext)",
    "mesh_mtls": "mesh http_client with identity -> mesh server, mode strict (mTLS, SPIFFE ID "
    "of the server checked)",
    "haproxy_pair": "httpx.Client -> HAProxy client sidecar (plaintext in, mTLS out) -> HAProxy "
    "server sidecar (mTLS in, client certificate required) -> bench backend",
    "httpx_mtls": "httpx.Client with the mesh client's certificate -> mesh server, mode strict "
    "(diagnostic: the same TLS without the mesh's client)",
}
# a - b, as printed; the first four are what this benchmark is for
KEEPALIVE_DIFFS = (
    ("mesh_mtls", "mesh_plain"),
    ("haproxy_pair", "direct"),
    ("mesh_mtls", "direct"),
    ("mesh_mtls", "haproxy_pair"),
    ("mesh_plain", "direct"),
    ("mesh_mtls", "httpx_mtls"),
)
CONNECTION_DIFFS = (
    ("mesh_mtls", "mesh_plain"),
    ("httpx_mtls", "direct"),
    ("haproxy_pair", "direct"),
    ("mesh_mtls", "haproxy_pair"),
    ("mesh_mtls", "httpx_mtls"),
    ("mesh_plain", "direct"),
)
METRICS = ("p50_us", "p99_us", "cpu_us", "server_cpu_us", "path_cpu_us")


@dataclass(frozen=True)
class Settings:
    mode: str
    rounds: int
    requests: int  # per client per round, keep-alive
    warmup: int
    conn_rounds: int
    conn_requests: int  # per client per round, one new connection each
    conn_warmup: int


FULL = Settings(
    mode="full",
    rounds=9,
    requests=2000,
    warmup=500,
    conn_rounds=5,
    conn_requests=100,
    conn_warmup=20,
)
QUICK = Settings(
    mode="quick",
    rounds=3,
    requests=300,
    warmup=100,
    conn_rounds=3,
    conn_requests=30,
    conn_warmup=10,
)


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


@contextmanager
def process_group(
    name: str, argv: Sequence[str], ready: Callable[[], bool], timeout: float = 15.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in its own process group, wait until ``ready()``; on exit
    SIGTERM then SIGKILL the group (bench/run.py's ``_stop``)."""
    process: subprocess.Popen[bytes] | None = None
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s")
            time.sleep(0.05)
        yield process
    finally:
        if process is not None:
            _stop(process)


def mesh_server(mode: str, ca_dir: Path | None) -> tuple[int, list[str]]:
    """(port, command line) of a bench/mtls_server.py subprocess on a free port."""
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "mtls_server.py"), "--port", str(port)]
    argv += ["--mode", mode]
    if ca_dir is not None:
        argv += ["--ca-dir", str(ca_dir)]
    return port, argv


# -- TLS probes ------------------------------------------------------------------------


def tls_get(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    """``GET /`` over TLS with ``context``, one connection: the status (0 when refused),
    the protocol, cipher and SPIFFE ID of the server, or the error."""
    out: dict[str, Any] = {"status": 0}
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw,
            context.wrap_socket(raw, server_hostname=SERVICE) as tls,
        ):
            out.update(
                tls_version=tls.version(),
                cipher=(tls.cipher() or ("?",))[0],
                server_id=peer_spiffe_id(tls),
            )
            tls.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    except OSError as exc:  # ssl.SSLError included: a refused certificate
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    head = data.split(b"\r\n", 1)[0].split()
    if len(head) >= 2 and head[1].isdigit():
        out["status"] = int(head[1])
    else:
        out["error"] = f"no HTTP response ({len(data)} bytes)"
    return out


def no_cert_context(bundle: Path) -> ssl.SSLContext:
    """A client that trusts the CA but presents no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(bundle))
    return context


def refused(result: dict[str, Any]) -> bool:
    return result["status"] == 0 and "error" in result


# -- HAProxy ---------------------------------------------------------------------------

HAPROXY_COMMON = """\
global
    nbthread 1
    maxconn 1024

defaults
    mode http
    no log
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
"""

# No `sni` and no `verifyhost`: HAProxy then verifies the chain against ca-file and
# ignores the names (the certificates carry a SPIFFE URI SAN only, no DNS name).
HAPROXY_CLIENT_SIDECAR = (
    HAPROXY_COMMON
    + """
frontend outbound
    bind 127.0.0.1:{listen}
    default_backend bench

backend bench
    server bench 127.0.0.1:{upstream} ssl verify required ca-file {ca} crt {crt}
"""
)

HAPROXY_SERVER_SIDECAR = (
    HAPROXY_COMMON
    + """
frontend inbound
    bind 127.0.0.1:{listen} ssl crt {crt} ca-file {ca} verify required
    default_backend app

backend app
    server app 127.0.0.1:{backend}
"""
)


def haproxy_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


def write_haproxy_config(binary: str, path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    check = subprocess.run([binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejects {path.name}:\n{check.stdout}{check.stderr}")


def haproxy_certificate(ca: CertificateAuthority, service: str, folder: Path) -> Path:
    """Issue a certificate for ``service``; certificate chain and key in one PEM file."""
    cert, key = ca.write_issued(ca.issue(service, ttl=datetime.timedelta(hours=1)), folder)
    combined = folder / f"{service}.combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    combined.chmod(0o600)
    return combined


# -- measurement -----------------------------------------------------------------------


@dataclass
class Client:
    """One client of the comparison and the processes that serve it."""

    name: str
    client: httpx.Client  # keep-alive phase
    fresh: Callable[[], httpx.Client]  # new-connection phase: a new client per request
    url: str
    pids: tuple[int, ...]


def server_cpu_s(pids: Sequence[int]) -> float:
    return sum(_proc_cpu_s(pid) for pid in pids)


def keepalive_block(c: Client, n: int) -> dict[str, float]:
    s0 = server_cpu_s(c.pids)
    summary = sync_block(c.client, c.url, n).summary()
    summary["server_cpu_us"] = (server_cpu_s(c.pids) - s0) / n * 1e6
    summary["path_cpu_us"] = summary["cpu_us"] + summary["server_cpu_us"]
    return summary


def connection_block(c: Client, n: int) -> dict[str, float]:
    """``n`` requests, each by a new client on a new connection; the client's creation
    and closing are not timed, nor counted in its CPU (the servers' CPU includes the
    closing)."""
    latencies = [0] * n
    cpu = 0.0
    clock = time.perf_counter_ns
    process_time = time.process_time
    gc.collect()
    s0 = server_cpu_s(c.pids)
    for i in range(n):
        client = c.fresh()
        try:
            c0 = process_time()
            t0 = clock()
            response = client.get(c.url)
            latencies[i] = clock() - t0
            cpu += process_time() - c0
        finally:
            client.close()
        if response.status_code != 200:
            raise RuntimeError(f"{c.name}: status {response.status_code}")
    server = server_cpu_s(c.pids) - s0
    lat = sorted(latencies)
    return {
        "p50_us": percentile(lat, 50) / 1e3,
        "p99_us": percentile(lat, 99) / 1e3,
        "cpu_us": cpu / n * 1e6,
        "server_cpu_us": server / n * 1e6,
        "path_cpu_us": (cpu + server) / n * 1e6,
    }


def run_rounds(
    clients: dict[str, Client],
    block: Callable[[Client, int], dict[str, float]],
    rounds: int,
    n: int,
    warmup: int,
    phase: str,
) -> list[dict[str, dict[str, float]]]:
    for c in clients.values():
        block(c, warmup)
    out: list[dict[str, dict[str, float]]] = []
    for r in range(rounds):
        result = {name: block(clients[name], n) for name in rotated(list(clients), r)}
        out.append(result)
        print(
            f"  {phase} round {r + 1}/{rounds}: "
            + ", ".join(f"{name} {result[name]['p50_us']:.0f}" for name in clients)
            + " µs p50",
            flush=True,
        )
    return out


def analyse(
    rounds: list[dict[str, dict[str, float]]], diffs: Sequence[tuple[str, str]], n: int
) -> dict[str, Any]:
    out = aggregate(rounds, CLIENTS)
    out["requests_per_round"] = n
    # the servers' CPU comes from /proc in clock ticks: this is one tick per request
    out["server_cpu_resolution_us"] = 1e6 / os.sysconf("SC_CLK_TCK") / n
    out["differences"] = {f"{a} - {b}": paired_delta(rounds, a, b, METRICS) for a, b in diffs}
    return out


@contextmanager
def other_load(pids: Sequence[int], into: dict[str, Any]) -> Iterator[None]:
    """As bench/run.py's ``other_load``, for several server processes: the CPU that
    processes other than this one and ``pids`` used during the block, and steal time."""
    busy0, steal0 = _system_cpu_s()
    own0 = time.process_time() + server_cpu_s(pids)
    wall0 = time.perf_counter()
    try:
        yield
    finally:
        busy1, steal1 = _system_cpu_s()
        own1 = time.process_time() + server_cpu_s(pids)
        wall = time.perf_counter() - wall0
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        into["other_load"] = {
            "wall_s": wall,
            "other_cpu_s": other,
            "other_cpus": other / wall if wall else 0.0,
            "steal_s": steal1 - steal0,
        }


def default_context_ms(calls: int = 10) -> float:
    """What httpcore's ``default_ssl_context()`` takes (ms, median): httpcore builds one
    for every new https connection of a pool created without ``ssl_context``."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        default_ssl_context()
        times.append(time.perf_counter() - t0)
    return med(times) * 1e3


# -- report ----------------------------------------------------------------------------


def print_phase(title: str, phase: dict[str, Any]) -> None:
    print(f"\n== {title}")
    print(
        f"{'client':<26}{'p50 µs':>10}{'p99 µs':>10}{'CPU µs/req':>12}"
        f"{'servers CPU':>13}{'path CPU':>10}"
    )
    for name in CLIENTS:
        m = phase[name]
        print(
            f"{LABELS[name]:<26}{m['p50_us']:>10.1f}{m['p99_us']:>10.1f}{m['cpu_us']:>12.1f}"
            f"{m['server_cpu_us']:>13.1f}{m['path_cpu_us']:>10.1f}"
        )
    print("medians of the per-round differences:")
    for key, d in phase["differences"].items():
        a, _, b = key.partition(" - ")
        text = f"{LABELS[a]} - {LABELS[b]}"
        print(
            f"{text:<44}{d['p50_us']:>+9.1f}{d['p99_us']:>+10.1f}{d['cpu_us']:>+12.1f}"
            f"{d['server_cpu_us']:>+13.1f}{d['path_cpu_us']:>+10.1f}"
        )


def describe_check(check: Any) -> str:
    if not isinstance(check, dict):
        return str(check)
    tls = f"{check.get('tls_version')} {check.get('cipher')}, server {check.get('server_id')}"
    if check["status"]:
        return f"HTTP {check['status']} ({tls})"
    return f"refused: {check.get('error')}"


def print_report(result: dict[str, Any]) -> None:
    s = result["settings"]
    checks = result["setup"]["checks"]
    print("\n== setup checks")
    for name, check in checks.items():
        print(f"{name:<44}{describe_check(check)}")
    print_phase(
        f"keep-alive, sequential ({s['rounds']} rounds x {s['requests']} requests per client; "
        "medians over rounds; CPU in µs per request: this process, the servers and sidecars "
        "on the path, both)",
        result["keepalive"],
    )
    print_phase(
        f"new connection per request ({s['conn_rounds']} rounds x {s['conn_requests']} "
        "requests per client, each by a new client)",
        result["new_connection"],
    )
    ka = result["keepalive"]["differences"]
    nc = result["new_connection"]["differences"]
    print(
        "\nmesh mTLS - mesh plaintext, p50 per round: "
        + ", ".join(f"{d:+.0f}" for d in ka["mesh_mtls - mesh_plain"]["p50_us_rounds"])
        + " µs"
    )
    print(
        "haproxy pair - direct, p50 per round: "
        + ", ".join(f"{d:+.0f}" for d in ka["haproxy_pair - direct"]["p50_us_rounds"])
        + " µs"
    )
    print(
        f"new mTLS connection with the mesh: +{nc['mesh_mtls - mesh_plain']['p50_us']:.0f} µs p50 "
        f"over a new plaintext one; httpx with the same certificate: "
        f"+{nc['httpx_mtls - direct']['p50_us']:.0f} µs over direct plaintext. httpcore's "
        f"default_ssl_context(), built per new https connection when the pool has no "
        f"ssl_context: {result['diagnostics']['httpcore_default_ssl_context_ms']:.1f} ms"
    )
    loads = [
        f"{phase} {result[phase]['other_load']['other_cpus']:.2f}"
        f" (steal {result[phase]['other_load']['steal_s']:.1f} s)"
        for phase in ("keepalive", "new_connection")
    ]
    print("CPUs used by other processes, per phase: " + ", ".join(loads))


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "note": "loopback; the client, servers and sidecars share the CPUs",
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~10 s)")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    parser.add_argument("--haproxy", default=shutil.which("haproxy") or HAPROXY)
    args = parser.parse_args(argv)
    # SIGTERM too unwinds through the finally blocks that stop the subprocesses
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    s = QUICK if args.quick else FULL
    output = args.output or RESULTS_DIR / ("mtls-quick.json" if args.quick else "mtls.json")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {
            **versions(),
            "openssl": ssl.OPENSSL_VERSION,
            "haproxy": haproxy_version(args.haproxy),
        },
        "settings": asdict(s),
    }
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshlib-bench-mtls-")))
        ca_dir = tmp / "ca"
        ca = CertificateAuthority.init(ca_dir, TRUST_DOMAIN)
        bundle = tmp / "bundle.pem"
        bundle.write_bytes(ca.trust_bundle_pem())
        probe_cert, probe_key = ca.write_issued(ca.issue("probe"), tmp / "probe")
        probe = client_context(probe_cert, probe_key, bundle)

        # servers
        backend = stack.enter_context(bench_server())
        plain_port, argv_plain = mesh_server("disabled", None)
        mesh_plain_server = stack.enter_context(
            process_group("mesh server (plaintext)", argv_plain, lambda: _ready(plain_port))
        )
        tls_port, argv_tls = mesh_server("strict", ca_dir)
        mesh_tls_server = stack.enter_context(
            process_group(
                "mesh server (mTLS)", argv_tls, lambda: tls_get(tls_port, probe)["status"] == 200
            )
        )
        # the HAProxy pair
        hdir = tmp / "haproxy"
        hdir.mkdir()
        server_sidecar_port, client_sidecar_port = free_port(), free_port()
        configs = {
            "server_sidecar": HAPROXY_SERVER_SIDECAR.format(
                listen=server_sidecar_port,
                backend=backend.port,
                crt=haproxy_certificate(ca, SERVICE, hdir),
                ca=bundle,
            ),
            "client_sidecar": HAPROXY_CLIENT_SIDECAR.format(
                listen=client_sidecar_port,
                upstream=server_sidecar_port,
                crt=haproxy_certificate(ca, "client", hdir),
                ca=bundle,
            ),
        }
        for name, text in configs.items():
            write_haproxy_config(args.haproxy, hdir / f"{name}.cfg", text)
        hap_server = stack.enter_context(
            process_group(
                "haproxy server sidecar",
                [args.haproxy, "-db", "-f", str(hdir / "server_sidecar.cfg")],
                lambda: _accepts(server_sidecar_port),
            )
        )
        hap_client = stack.enter_context(
            process_group(
                "haproxy client sidecar",
                [args.haproxy, "-db", "-f", str(hdir / "client_sidecar.cfg")],
                lambda: _ready(client_sidecar_port),  # a 200 through the whole chain
            )
        )
        pids = {
            "backend": backend.process.pid,
            "mesh_plain_server": mesh_plain_server.pid,
            "mesh_tls_server": mesh_tls_server.pid,
            "haproxy_server_sidecar": hap_server.pid,
            "haproxy_client_sidecar": hap_client.pid,
        }
        print(
            f"{s.mode} run: backend :{backend.port}, mesh servers :{plain_port} (plaintext) "
            f":{tls_port} (mTLS), haproxy client sidecar :{client_sidecar_port} -> server "
            f"sidecar :{server_sidecar_port} -> backend; pids {pids}",
            flush=True,
        )

        # what each server accepts and refuses
        refuse_mesh = tls_get(tls_port, no_cert_context(bundle))
        refuse_sidecar = tls_get(server_sidecar_port, no_cert_context(bundle))
        probe_sidecar = tls_get(server_sidecar_port, probe)
        probe_mesh = tls_get(tls_port, probe)
        checks: dict[str, Any] = {
            "haproxy chain, GET via client sidecar": _ready(client_sidecar_port),
            "server sidecar, client with cert": probe_sidecar,
            "server sidecar, client without cert": refuse_sidecar,
            "mesh mTLS server, client with cert": probe_mesh,
            "mesh mTLS server, client without cert": refuse_mesh,
            "mesh mTLS server, plaintext GET answered": _ready(tls_port),
        }
        if not (
            refused(refuse_sidecar)
            and refused(refuse_mesh)
            and probe_sidecar["status"] == 200
            and probe_mesh["status"] == 200
            and probe_mesh["server_id"] == SERVER_ID
            and checks["haproxy chain, GET via client sidecar"]
            and not checks["mesh mTLS server, plaintext GET answered"]
        ):
            raise RuntimeError(f"the servers do not behave as expected: {checks}")

        # clients
        mesh_plain = stack.enter_context(
            Mesh(
                {"services": {SERVICE: {"endpoints": [{"address": f"127.0.0.1:{plain_port}"}]}}},
                service="client",
            )
        )
        mesh_tls = stack.enter_context(
            Mesh(
                {
                    "trust_domain": TRUST_DOMAIN,
                    "identity": {"ca": {"dir": str(ca_dir), "ttl": "1h"}},
                    "services": {SERVICE: {"endpoints": [{"address": f"127.0.0.1:{tls_port}"}]}},
                },
                service="client",
            )
        )
        assert mesh_tls.identity is not None
        credentials = mesh_tls.identity.credentials()
        # the mesh client's certificate in a context of its own (httpcore sets ALPN on it)
        own = (credentials.cert_file, credentials.key_file, credentials.bundle_file)

        # a prebuilt context for the clients' unused https side: creating httpx's
        # default one costs ms per client (the new-connection phase makes many)
        unused = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        https_ctx = client_context(*own)
        clients = {
            "direct": Client(
                "direct",
                stack.enter_context(httpx.Client(trust_env=False)),
                lambda: httpx.Client(trust_env=False, verify=unused),
                f"http://127.0.0.1:{backend.port}/",
                (backend.process.pid,),
            ),
            "mesh_plain": Client(
                "mesh_plain",
                stack.enter_context(mesh_plain.http_client()),
                lambda: mesh_plain.http_client(verify=unused),
                MESH_URL,
                (mesh_plain_server.pid,),
            ),
            "mesh_mtls": Client(
                "mesh_mtls",
                stack.enter_context(mesh_tls.http_client()),
                lambda: mesh_tls.http_client(verify=unused),
                MESH_URL,
                (mesh_tls_server.pid,),
            ),
            "haproxy_pair": Client(
                "haproxy_pair",
                stack.enter_context(httpx.Client(trust_env=False)),
                lambda: httpx.Client(trust_env=False, verify=unused),
                f"http://127.0.0.1:{client_sidecar_port}/",
                (hap_client.pid, hap_server.pid, backend.process.pid),
            ),
            "httpx_mtls": Client(
                "httpx_mtls",
                stack.enter_context(httpx.Client(trust_env=False, verify=https_ctx)),
                lambda: httpx.Client(trust_env=False, verify=https_ctx),
                f"https://127.0.0.1:{tls_port}/",
                (mesh_tls_server.pid,),
            ),
        }
        for c in clients.values():
            response = c.client.get(c.url)
            if response.status_code != 200 or response.text != "ok":
                raise RuntimeError(f"{c.name}: {response.status_code} {response.text!r}")
        checks["mesh mTLS client, server identity"] = SERVER_ID
        checks["mesh mTLS client identity"] = credentials.spiffe_id
        result["setup"] = {
            "paths": PATHS,
            "haproxy": {
                name: text.replace(str(tmp), "$TMP").splitlines() for name, text in configs.items()
            },
            "checks": checks,
        }
        all_pids = tuple(pids.values())
        for phase, block, rounds, n, warmup, diffs in (
            ("keepalive", keepalive_block, s.rounds, s.requests, s.warmup, KEEPALIVE_DIFFS),
            (
                "new_connection",
                connection_block,
                s.conn_rounds,
                s.conn_requests,
                s.conn_warmup,
                CONNECTION_DIFFS,
            ),
        ):
            print(f"{phase} ...", flush=True)
            load: dict[str, Any] = {}
            with other_load(all_pids, load):
                measured = run_rounds(clients, block, rounds, n, warmup, phase)
            result[phase] = analyse(measured, diffs, n)
            result[phase].update(load)
        result["diagnostics"] = {"httpcore_default_ssl_context_ms": default_context_ms()}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    busy = [
        f"{phase} {result[phase]['other_load']['other_cpus']:.2f}"
        for phase in ("keepalive", "new_connection")
        if result[phase]["other_load"]["other_cpus"] > BUSY_OTHER_CPUS
    ]
    if busy:
        result["warning"] = "other processes used CPU during: " + ", ".join(busy) + " CPUs"
    print_report(result)
    write_json(result, output)
    print(f"\nwrote {output} ({result['elapsed_s']} s)")
    if "warning" in result:
        print(f"WARNING: {result['warning']}; these figures are suspect, run again")
    else:
        print("no other load detected on the machine during the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
