"""Mesh mTLS end to end with real handshakes on loopback: mesh clients (sync and
async) to `mesh.serve`, identity checks on both sides, JWT and RBAC in mesh.asgi,
and certificates that rotate under load."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from meshlib import Mesh
from meshlib.tls.ca import CertificateAuthority
from meshlib.tls.contexts import PeerIdentityError, client_context, server_context
from meshlib.tls.server import MeshServer

TD = "example.org"


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes what the mesh knows about the caller."""
    if scope["type"] != "http":
        return
    mesh = scope.get("extensions", {}).get("mesh", {})
    principal = mesh.get("principal")
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    body = json.dumps(
        {
            "peer": mesh.get("peer"),
            "principal": principal.principal if principal is not None else None,
            "scheme": scope["scheme"],
            "tls": "tls" in scope.get("extensions", {}),
            "authorization": headers.get("authorization"),
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", TD)


def identity_policy(ca: CertificateAuthority, ttl: str = "1h") -> dict[str, Any]:
    return {"trust_domain": TD, "identity": {"ca": {"dir": str(ca.directory), "ttl": ttl}}}


def client_policy(ca: CertificateAuthority, address: str, **service: Any) -> dict[str, Any]:
    return {
        **identity_policy(ca),
        "services": {"users": {"endpoints": [{"address": address}], **service}},
    }


@pytest.fixture
def users_server(ca: CertificateAuthority) -> Iterator[str]:
    """`users` served with strict mTLS; yields its address."""
    policy = {**identity_policy(ca), "services": {"users": {"inbound": {"mtls": "strict"}}}}
    with Mesh(policy, service="users") as server_mesh:
        running = server_mesh.serve(whoami, background=True)
        assert running is not None
        try:
            yield f"127.0.0.1:{running.port}"
        finally:
            running.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_mesh_clients_call_with_mtls_and_the_server_sees_their_identity(
    ca: CertificateAuthority, users_server: str, kind: str
) -> None:
    with Mesh(client_policy(ca, users_server), service="frontend") as mesh:
        reply = _get(mesh, kind, "http://users/who")
    assert reply["scheme"] == "https" and reply["tls"]
    assert reply["peer"] == f"spiffe://{TD}/ns/default/sa/frontend"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_client_refuses_a_server_with_another_identity(
    ca: CertificateAuthority, users_server: str, kind: str
) -> None:
    wrong = client_policy(
        ca, users_server, tls={"identity": f"spiffe://{TD}/ns/default/sa/billing"}
    )
    with Mesh(wrong, service="frontend") as mesh, pytest.raises(PeerIdentityError, match="users"):
        _get(mesh, kind, "http://users/who")


def test_client_refuses_a_server_from_an_untrusted_ca(
    ca: CertificateAuthority, tmp_path: Path, users_server: str
) -> None:
    other = CertificateAuthority.init(tmp_path / "other-ca", TD)
    mesh = Mesh(client_policy(other, users_server), service="frontend")
    with mesh, mesh.http_client() as client, pytest.raises(httpx.ConnectError):
        client.get("http://users/who")


def test_strict_server_refuses_clients_without_a_certificate_or_plaintext(
    ca: CertificateAuthority, tmp_path: Path, users_server: str
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.trust_bundle_pem())
    no_cert = ssl.create_default_context(cafile=str(bundle))
    no_cert.check_hostname = False
    with httpx.Client(verify=no_cert) as client, pytest.raises(httpx.TransportError):
        client.get(f"https://{users_server}/who")
    with httpx.Client() as client, pytest.raises(httpx.TransportError):
        client.get(f"http://{users_server}/who")
    # a mesh without an identity calls plaintext, which a strict server refuses
    plain = {"services": {"users": {"endpoints": [{"address": users_server}]}}}
    with Mesh(plain) as mesh, mesh.http_client() as client, pytest.raises(httpx.TransportError):
        client.get("http://users/who")


def test_expired_certificates_are_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = {}
    for service in ("users", "frontend"):
        issued = ca.issue(service, ttl=timedelta(seconds=1), not_before_skew=timedelta(0))
        files[service] = ca.write_issued(issued, tmp_path, name=service)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.trust_bundle_pem())
    time.sleep(2.1)  # both certificates are now past not_after
    expired_server = server_context(*files["users"], bundle, require_client_cert=True)
    server = MeshServer(whoami, mode="strict", server_context=lambda: expired_server)
    with server.start_in_thread() as running:
        # a mesh client with a valid identity refuses the expired server certificate
        mesh = Mesh(client_policy(ca, f"127.0.0.1:{running.port}"), service="frontend")
        with mesh, mesh.http_client() as client, pytest.raises(httpx.ConnectError):
            client.get("http://users/who")
    fresh = ca.issue("users")
    fresh_files = ca.write_issued(fresh, tmp_path, name="users-fresh")
    good_server = server_context(*fresh_files, bundle, require_client_cert=True)
    expired_client = client_context(*files["frontend"], bundle)
    server = MeshServer(whoami, mode="strict", server_context=lambda: good_server)
    # and a server refuses an expired client certificate
    with (
        server.start_in_thread() as running,
        httpx.Client(verify=expired_client) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get(f"https://127.0.0.1:{running.port}/who")


def test_permissive_server_takes_mtls_and_plaintext_on_one_port(
    ca: CertificateAuthority,
) -> None:
    policy = {**identity_policy(ca), "services": {"users": {"inbound": {"mtls": "permissive"}}}}
    with Mesh(policy, service="users") as server_mesh:
        running = server_mesh.serve(whoami, background=True)
        assert running is not None
        try:
            address = f"127.0.0.1:{running.port}"
            with Mesh(client_policy(ca, address), service="frontend") as mesh:
                secure = _get(mesh, "sync", "http://users/who")
            plain_policy = {
                "services": {
                    "users": {"endpoints": [{"address": address}], "tls": {"mode": "disabled"}}
                }
            }
            with Mesh(plain_policy) as mesh:
                plain = _get(mesh, "sync", "http://users/who")
        finally:
            running.stop()
    assert secure["peer"].endswith("/sa/frontend") and secure["scheme"] == "https"
    assert plain["peer"] == "" and plain["scheme"] == "http"


@pytest.fixture
def signer() -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    return key, {"keys": [jwk]}


def token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": "https://idp.example", "sub": "alice", "aud": "users", "exp": now + 300}
    body.update(claims)
    return pyjwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def test_jwt_and_rbac_on_a_mesh_served_app(
    ca: CertificateAuthority, signer: tuple[rsa.RSAPrivateKey, dict[str, Any]]
) -> None:
    key, jwks = signer
    inbound = {
        "mtls": "strict",
        "jwt": [
            {
                "name": "idp",
                "issuer": "https://idp.example",
                "audiences": ["users"],
                "algorithms": ["RS256"],
                "jwks": {"inline": jwks},
            }
        ],
        "authz": [
            {
                "name": "admins-only-on-admin",
                "action": "DENY",
                "rules": [
                    {
                        "to": [{"paths": ["/admin/*"]}],
                        "when": [{"key": "request.auth.claims[role]", "not_values": ["admin"]}],
                    }
                ],
            },
            {
                "name": "frontend-with-a-token",
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [
                            {
                                "principals": [f"spiffe://{TD}/ns/default/sa/frontend"],
                                "request_principals": ["https://idp.example/*"],
                            }
                        ]
                    }
                ],
            },
        ],
    }
    policy = {**identity_policy(ca), "services": {"users": {"inbound": inbound}}}
    with Mesh(policy, service="users") as server_mesh:
        running = server_mesh.serve(whoami, background=True)
        assert running is not None
        try:
            address = f"127.0.0.1:{running.port}"
            results = {}
            bearer = f"Bearer {token(key)}"
            calls = [
                ("no token", {}, "/orders"),
                ("token", {"authorization": bearer}, "/orders"),
                ("expired", {"authorization": f"Bearer {token(key, exp=1)}"}, "/x"),
                ("tampered", {"authorization": f"{bearer}x"}, "/x"),
                ("admin path", {"authorization": bearer}, "/admin/a"),
                ("admin role", {"authorization": f"Bearer {token(key, role='admin')}"}, "/admin/a"),
            ]
            for caller in ("frontend", "batch"):
                mesh = Mesh(client_policy(ca, address), service=caller)
                with mesh, mesh.http_client() as client:
                    for name, headers, path in calls:
                        results[caller, name] = client.get(f"http://users{path}", headers=headers)
        finally:
            running.stop()
    ok = results["frontend", "token"]
    assert ok.status_code == 200 and ok.json()["principal"] == "https://idp.example/alice"
    assert results["frontend", "admin role"].status_code == 200
    for name in ("expired", "tampered"):
        reply = results["frontend", name]
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"].startswith('Bearer realm="idp"')
    for caller, name in [
        ("frontend", "no token"),
        ("frontend", "admin path"),
        ("batch", "token"),
        ("batch", "admin role"),
    ]:
        reply = results[caller, name]
        assert reply.status_code == 403, (caller, name)
        assert "rbac-" in reply.text and "admins-only" not in reply.text  # no policy leak


def test_a_served_request_forwards_its_verified_jwt_to_the_next_service(
    ca: CertificateAuthority, signer: tuple[rsa.RSAPrivateKey, dict[str, Any]]
) -> None:
    key, jwks = signer
    provider = {
        "name": "idp",
        "issuer": "https://idp.example",
        "algorithms": ["RS256"],
        "jwks": {"inline": jwks},
        "forward": True,
    }
    backend_policy = {
        **identity_policy(ca),
        "services": {"orders": {"inbound": {"mtls": "strict"}}},
    }
    with Mesh(backend_policy, service="orders") as orders_mesh:
        orders = orders_mesh.serve(whoami, background=True)
        assert orders is not None
        front_policy = {
            **identity_policy(ca),
            "services": {
                "users": {"inbound": {"mtls": "strict", "jwt": [provider]}},
                "orders": {
                    "endpoints": [{"address": f"127.0.0.1:{orders.port}"}],
                    "forward_jwt": True,
                },
            },
        }
        with Mesh(front_policy, service="users") as users_mesh:

            async def front(scope: dict[str, Any], receive: Any, send: Any) -> None:
                async with users_mesh.async_http_client() as client:
                    seen = (await client.get("http://orders/")).content
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": seen})

            users = users_mesh.serve(front, background=True)
            assert users is not None
            try:
                address = f"127.0.0.1:{users.port}"
                bearer = f"Bearer {token(key)}"
                mesh = Mesh(client_policy(ca, address), service="frontend")
                with mesh, mesh.http_client() as client:
                    seen = client.get("http://users/", headers={"authorization": bearer})
            finally:
                users.stop()
                orders.stop()
    assert seen.status_code == 200
    assert seen.json()["authorization"] == bearer  # forwarded by the users service
    assert seen.json()["peer"] == f"spiffe://{TD}/ns/default/sa/users"  # and mTLS between them


def test_zero_failed_requests_across_certificate_rotations_under_load(
    ca: CertificateAuthority,
) -> None:
    short = identity_policy(ca, ttl="3s")
    server_policy = {**short, "services": {"users": {"inbound": {"mtls": "strict"}}}}
    with Mesh(server_policy, service="users") as server_mesh:
        running = server_mesh.serve(whoami, background=True)
        assert running is not None and server_mesh.identity is not None
        address = f"127.0.0.1:{running.port}"
        policy = {**short, "services": {"users": {"endpoints": [{"address": address}]}}}
        failures: list[BaseException] = []
        peers: set[str] = set()
        stop = time.monotonic() + 7.0
        with Mesh(policy, service="frontend") as mesh:
            assert mesh.identity is not None

            def load() -> None:
                # short keep-alive: connections are opened again and again, and
                # every new one must use the newest certificates on both sides
                limits = httpx.Limits(keepalive_expiry=0.2)
                with httpx.Client(transport=mesh.transport(limits=limits)) as client:
                    while time.monotonic() < stop and len(failures) < 5:
                        try:
                            reply = client.get("http://users/who")
                            reply.raise_for_status()
                            peers.add(reply.json()["peer"])
                        except Exception as exc:
                            failures.append(exc)
                        time.sleep(0.01)

            threads = [threading.Thread(target=load) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=20)
            client_rotations = mesh.identity.rotations
        server_rotations = server_mesh.identity.rotations
        running.stop()
    assert not failures, failures[:3]
    assert client_rotations >= 2 and server_rotations >= 2
    assert peers == {f"spiffe://{TD}/ns/default/sa/frontend"}


def _get(mesh: Mesh, kind: str, url: str) -> dict[str, Any]:
    if kind == "sync":
        with mesh.http_client() as client:
            response = client.get(url)
            response.raise_for_status()
            return dict(response.json())

    async def run() -> dict[str, Any]:
        async with mesh.async_http_client() as client:
            response = await client.get(url)
            response.raise_for_status()
            return dict(response.json())

    return asyncio.run(run())


SERVE_SCRIPT = """
import sys
from meshlib import Mesh

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

policy = {"trust_domain": "example.org", "identity": {"ca": {"dir": sys.argv[1]}}}
mesh = Mesh(policy, service="users")
print(mesh.identity.credentials().cert_file.parent, flush=True)
mesh.serve(app, mode="strict")
"""


def test_sigterm_stops_mesh_serve_and_removes_the_identity_files(
    ca: CertificateAuthority,
) -> None:
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(ca.directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        folder = Path(child.stdout.readline().strip())
        assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
        time.sleep(0.5)  # let uvicorn start serving
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) != -signal.SIGTERM  # exited, not killed
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=5)
    assert not folder.exists()  # no private key left behind
