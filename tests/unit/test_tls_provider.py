"""The identity provider: renewal at 2/3 of the lifetime, file sources, hygiene."""

from __future__ import annotations

import os
import ssl
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from meshlib import Mesh
from meshlib.errors import ConfigError, MeshError
from meshlib.tls.ca import CertificateAuthority
from meshlib.tls.provider import Credentials, FileSource, IdentityProvider, LocalCASource


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", "example.org")


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_renews_at_two_thirds_of_the_lifetime(ca: CertificateAuthority) -> None:
    clock = FakeClock()
    source = LocalCASource(ca.directory, "users", ttl=30.0)
    provider = IdentityProvider(source, clock=clock, background=False)
    try:
        first = provider.credentials()
        assert first.spiffe_id == "spiffe://example.org/ns/default/sa/users"
        lifetime = first.not_after - first.not_before
        due = first.not_before + lifetime * 2 / 3
        clock.now = due - 0.5
        assert provider.credentials() is first
        context = provider.client_context()
        assert provider.client_context() is context  # built once per generation
        clock.now = due + 0.01
        second = provider.credentials()
        assert second.generation == first.generation + 1
        assert second.chain_pem != first.chain_pem
        clock.now = second.not_before + 1  # well before the second one is due
        assert provider.client_context() is not context  # new connections, new certificate
        assert provider.credentials() is second
        assert provider.rotations == 1
    finally:
        provider.close()


def test_background_thread_renews_short_lived_certificates(ca: CertificateAuthority) -> None:
    seen: list[Credentials] = []
    renewed = threading.Event()

    def on_rotate(credentials: Credentials) -> None:
        seen.append(credentials)
        if len(seen) >= 2:
            renewed.set()

    provider = IdentityProvider(LocalCASource(ca.directory, "users", ttl=1.5), poll_interval=0.1)
    provider.on_rotate(on_rotate)
    try:
        assert renewed.wait(10), "two renewals of a 1.5 s certificate within 10 s"
        generations = [c.generation for c in seen]
        assert generations == sorted(set(generations)) and generations[0] >= 2
        for credentials in seen:
            assert credentials.not_after - credentials.not_before < 3
    finally:
        provider.close()


def test_file_source_picks_up_rewritten_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    out = tmp_path / "svid"
    out.mkdir()

    def write(service: str) -> None:
        issued = ca.issue(service, ttl=timedelta(hours=1))
        ca.write_issued(issued, out, name="svid", overwrite=True)

    write("users")
    (out / "bundle.pem").write_bytes(ca.trust_bundle_pem())
    source = FileSource(out / "svid.pem", out / "svid.key", out / "bundle.pem")
    provider = IdentityProvider(source, background=False)
    try:
        assert provider.spiffe_id.endswith("/sa/users")
        time.sleep(0.01)
        write("orders")  # another agent rotates the files (and here: the identity)
        os.utime(out / "svid.pem")
        assert provider.credentials().spiffe_id.endswith("/sa/orders")
    finally:
        provider.close()


def test_broken_rewrite_keeps_the_current_credentials(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    out = tmp_path / "svid"
    out.mkdir()
    ca.write_issued(ca.issue("users"), out, name="svid")
    (out / "bundle.pem").write_bytes(ca.trust_bundle_pem())
    provider = IdentityProvider(
        FileSource(out / "svid.pem", out / "svid.key", out / "bundle.pem"), background=False
    )
    try:
        good = provider.credentials()
        (out / "svid.pem").write_text("not a certificate")
        assert provider.credentials() is good
        assert provider.failures >= 1
        assert isinstance(provider.client_context(), ssl.SSLContext)
    finally:
        provider.close()


def test_world_readable_key_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    out = tmp_path / "svid"
    out.mkdir()
    ca.write_issued(ca.issue("users"), out, name="svid")
    (out / "bundle.pem").write_bytes(ca.trust_bundle_pem())
    os.chmod(out / "svid.key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        FileSource(out / "svid.pem", out / "svid.key", out / "bundle.pem").load(1)


def test_policy_identity_and_config_dump_never_show_keys(ca: CertificateAuthority) -> None:
    policy = {
        "trust_domain": "example.org",
        "identity": {"ca": {"dir": str(ca.directory), "ttl": "10m"}},
        "services": {"users": {"endpoints": [{"address": "127.0.0.1:9"}]}},
    }
    with Mesh(policy, service="frontend") as mesh:
        assert mesh.identity is not None
        dump = mesh.config_dump()
        assert dump["identity"]["spiffe_id"] == "spiffe://example.org/ns/default/sa/frontend"
        assert "PRIVATE KEY" not in repr(dump)
        assert "PRIVATE KEY" not in repr(mesh.identity.credentials())
        assert mesh.snapshot.peer_identities["users"] == (
            "spiffe://example.org/ns/default/sa/users"
        )


def test_identity_ca_needs_a_service_name(ca: CertificateAuthority) -> None:
    policy = {"trust_domain": "example.org", "identity": {"ca": {"dir": str(ca.directory)}}}
    with pytest.raises(MeshError, match="service="):
        Mesh(policy)


def test_identity_policy_errors() -> None:
    with pytest.raises(ConfigError, match="exactly one source"):
        Mesh({"identity": {"namespace": "default"}})
    with pytest.raises(ConfigError, match="trust domain"):
        Mesh({"trust_domain": "Example.ORG"})
    bad = {"services": {"users": {"tls": {"identity": "spiffe://example.org/ns/**"}}}}
    with pytest.raises(ConfigError, match="identity"):
        Mesh(bad)


def test_cli_check_shows_identity_mtls_and_authz(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshlib.cli import main

    policy = tmp_path / "mesh.yaml"
    policy.write_text(
        """
trust_domain: example.org
identity: {namespace: prod, files: {cert: a.pem, key: a.key, bundle: b.pem}}
services:
  users:
    endpoints: [{address: 127.0.0.1:8001}]
    inbound:
      mtls: strict
      authz:
        - {name: trial, action: DENY, dry_run: true, rules: [{}]}
""",
        encoding="utf-8",
    )
    assert main(["check", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "mutual TLS to it: the server must be spiffe://example.org/ns/default/sa/users" in out
    assert "inbound: mtls strict; authz trial (DENY, dry run)" in out
    assert "identity: spiffe://example.org/ns/prod/sa/<service> from files" in out
