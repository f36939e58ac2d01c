"""mesh.asgi's inbound security, driven with ASGI scopes: every bad token is a 401
with a challenge (never a 500), and the RBAC matrix over callers, paths and methods
holds when the caller's identity comes from the TLS extension."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from meshlib import Mesh
from meshlib.tls.ca import CertificateAuthority

ISSUER = "https://idp.example"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def call(
    mesh: Mesh,
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    client_pem: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8001),
        "scheme": "https" if client_pem else "http",
    }
    if client_pem is not None:
        scope["extensions"] = {"tls": {"client_cert_chain": [client_pem], "tls_version": 0x0304}}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(mesh.asgi(app, "users")(scope, receive, send))
    start, body = sent[0], sent[1]
    response_headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], response_headers, body["body"]


@pytest.fixture(scope="module")
def keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    return key, other, {"keys": [jwk]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_every_bad_token_is_a_401_with_a_challenge(
    keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey, dict[str, Any]],
) -> None:
    key, other, jwks = keys
    now = int(time.time())
    good = {"iss": ISSUER, "sub": "alice", "aud": "users", "exp": now + 300}

    def sign(claims: dict[str, Any], signer: Any = key, kid: str = "k1") -> str:
        return pyjwt.encode(claims, signer, algorithm="RS256", headers={"kid": kid})

    valid = sign(good)
    head, payload, signature = valid.split(".")
    none_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    forged = _b64(json.dumps({**good, "sub": "root"}).encode())
    bad = {
        "expired": sign({**good, "exp": now - 3600}),
        "not yet valid": sign({**good, "nbf": now + 3600}),
        "wrong audience": sign({**good, "aud": "billing"}),
        "wrong issuer": sign({**good, "iss": "https://evil.example"}),
        "alg none": f"{none_header}.{payload}.",
        "tampered payload": f"{head}.{forged}.{signature}",
        "tampered signature": f"{head}.{payload}.{signature[:-4]}AAAA",
        "other key": sign(good, signer=other),
        "unknown kid": sign(good, signer=other, kid="k9"),
        "malformed": "not.a.jwt",
        "garbage": "%%%",
        "oversized": sign({**good, "pad": "x" * 10_000}),
    }
    inbound = {
        "jwt": [
            {
                "name": "idp",
                "issuer": ISSUER,
                "audiences": ["users"],
                "algorithms": ["RS256"],
                "jwks": {"inline": jwks},
                "leeway": "5s",
            }
        ]
    }
    with Mesh({"services": {"users": {"inbound": inbound}}}) as mesh:
        status, _, _ = call(mesh, headers={"authorization": f"Bearer {valid}"})
        assert status == 200
        for name, token in bad.items():
            status, headers, body = call(mesh, headers={"authorization": f"Bearer {token}"})
            assert status == 401, name
            challenge = headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="idp", error="invalid_token"'), name
            assert token not in challenge and token.encode() not in body


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "example.org")
    return {
        name: ca.issue(name, ttl=timedelta(hours=1)).cert_pem.decode()
        for name in ("frontend", "batch", "ops")
    }


RBAC = [
    {
        "name": "admin-is-ops",
        "action": "DENY",
        "rules": [
            {
                "from": [{"not_principals": ["spiffe://example.org/ns/default/sa/ops"]}],
                "to": [{"paths": ["/admin/*"]}],
            }
        ],
    },
    {
        "name": "public",
        "action": "ALLOW",
        "rules": [{"to": [{"methods": ["GET"], "paths": ["/public"]}]}],
    },
    {
        "name": "frontend-api",
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"principals": ["spiffe://example.org/ns/default/sa/frontend"]}],
                "to": [{"paths": ["/api/*"]}],
            }
        ],
    },
    {
        "name": "batch-reads",
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"principals": ["*/sa/batch"]}],
                "to": [{"methods": ["GET"], "paths": ["/api/*"]}],
            }
        ],
    },
    {"name": "ops", "action": "ALLOW", "rules": [{"from": [{"principals": ["*/sa/ops"]}]}]},
]

# caller → {(method, path): allowed}
MATRIX = {
    "frontend": {
        ("GET", "/public"): True,
        ("POST", "/public"): False,
        ("GET", "/api/orders"): True,
        ("POST", "/api/orders"): True,
        ("GET", "/admin/x"): False,
        ("POST", "/admin/x"): False,
    },
    "batch": {
        ("GET", "/public"): True,
        ("POST", "/public"): False,
        ("GET", "/api/orders"): True,
        ("POST", "/api/orders"): False,
        ("GET", "/admin/x"): False,
        ("POST", "/admin/x"): False,
    },
    "ops": {
        ("GET", "/public"): True,
        ("POST", "/public"): True,
        ("GET", "/api/orders"): True,
        ("POST", "/api/orders"): True,
        ("GET", "/admin/x"): True,
        ("POST", "/admin/x"): True,
    },
    "plaintext": {
        ("GET", "/public"): True,
        ("POST", "/public"): False,
        ("GET", "/api/orders"): False,
        ("POST", "/api/orders"): False,
        ("GET", "/admin/x"): False,
        ("POST", "/admin/x"): False,
    },
}


def test_rbac_matrix_through_the_middleware(
    peers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    policy = {"services": {"users": {"inbound": {"mtls": "permissive", "authz": RBAC}}}}
    with Mesh(policy) as mesh, caplog.at_level(logging.INFO, logger="meshlib"):
        for caller, cells in MATRIX.items():
            pem = peers.get(caller)
            for (method, path), allowed in cells.items():
                status, _, body = call(mesh, path, method, client_pem=pem)
                assert (status == 200) == allowed, (caller, method, path, status)
                if not allowed:
                    assert status == 403 and b"rbac-" in body
                    assert b"admin-is-ops" not in body and b"frontend-api" not in body
    assert "admin-is-ops" in caplog.text  # the log maps reason ids back to policies


def test_strict_mtls_refuses_plaintext_even_behind_another_server(peers: dict[str, str]) -> None:
    policy = {"services": {"users": {"inbound": {"mtls": "strict"}}}}
    with Mesh(policy) as mesh:
        assert call(mesh)[0] == 403
        assert call(mesh, client_pem=peers["frontend"])[0] == 200


def test_dry_run_logs_would_deny_and_lets_the_request_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trial = [{"name": "trial", "action": "DENY", "dry_run": True, "rules": [{}]}]
    with (
        Mesh({"services": {"users": {"inbound": {"authz": trial}}}}) as mesh,
        caplog.at_level(logging.INFO, logger="meshlib"),
    ):
        assert call(mesh, "/anything")[0] == 200
    assert "would deny" in caplog.text and "trial" in caplog.text


def test_keys_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from meshlib.tls.provider import IdentityProvider, LocalCASource

    with caplog.at_level(logging.DEBUG):
        ca = CertificateAuthority.init(tmp_path / "ca", "example.org")
        provider = IdentityProvider(LocalCASource(ca.directory, "users", ttl=60), background=False)
        provider.refresh()
        provider.close()
    assert caplog.records and "PRIVATE KEY" not in caplog.text
