"""The local CA, key file hygiene, a real mTLS handshake, and the ``ca``/``cert`` commands."""

from __future__ import annotations

import re
import socket
import ssl
import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from meshlib.cli import main
from meshlib.tls.ca import CertificateAuthority, IssuedCertificate
from meshlib.tls.identity import spiffe_ids_of
from meshlib.tls.keyfiles import read_private, write_private, write_public

USERS = "spiffe://example.org/ns/default/sa/users"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certs_of(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def verify_chain(ca: CertificateAuthority, issued: IssuedCertificate) -> list[x509.Certificate]:
    """Path validation from the leaf to the trust bundle (raises if it does not chain)."""
    leaf, *intermediates = certs_of(issued.chain_pem)
    store = Store(certs_of(ca.trust_bundle_pem()))
    verified = PolicyBuilder().store(store).build_client_verifier().verify(leaf, intermediates)
    assert [name.value for name in verified.subjects or []] == [issued.spiffe_id]
    return verified.chain


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "example.org")


@pytest.fixture(scope="module")
def ca_with_intermediate(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(
        tmp_path_factory.mktemp("ca") / "ca", "example.org", intermediate=True
    )


# -- key files ---------------------------------------------------------------------


def test_private_files_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    write_private(key, b"secret")
    assert mode(key) == 0o600
    assert read_private(key) == b"secret"
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_private(key, b"other")
    assert read_private(key) == b"secret"
    write_private(key, b"new", overwrite=True)
    assert (mode(key), read_private(key)) == (0o600, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["a.key"]  # no temp file left behind


def test_public_files_are_0644(tmp_path: Path) -> None:
    pem = tmp_path / "a.pem"
    write_public(pem, b"cert")
    assert mode(pem) == 0o644
    with pytest.raises(FileExistsError):
        write_public(pem, b"cert")
    write_public(pem, b"cert2", overwrite=True)
    assert (mode(pem), pem.read_bytes()) == (0o644, b"cert2")


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o620])
def test_read_private_refuses_loose_permissions(tmp_path: Path, loose: int) -> None:
    key = tmp_path / "a.key"
    write_private(key, b"secret")
    key.chmod(loose)
    with pytest.raises(PermissionError, match=re.escape(f"chmod 600 {key}")):
        read_private(key)


# -- the CA itself -----------------------------------------------------------------


def test_init_writes_files_with_safe_modes(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "ca"
    ca = CertificateAuthority.init(folder, "example.org")
    assert mode(folder) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["root.key", "root.pem"]
    assert mode(folder / "root.pem") == 0o644
    assert mode(folder / "root.key") == 0o600
    assert (folder / "root.pem").read_bytes() == ca.trust_bundle_pem()
    assert ca.trust_domain == "example.org"


def test_second_init_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path, "example.org")
    before = (tmp_path / "root.pem").read_bytes()
    with pytest.raises(FileExistsError, match="a CA already exists") as caught:
        CertificateAuthority.init(tmp_path, "other.org")
    assert str(tmp_path / "root.pem") in str(caught.value)
    assert str(tmp_path / "root.key") in str(caught.value)
    assert (tmp_path / "root.pem").read_bytes() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trust_domain": "Example.org"}, "invalid trust domain"),
        ({"trust_domain": "spiffe://example.org"}, "without 'spiffe://'"),
        ({"key_type": "ed25519"}, "unknown key type"),
        ({"ttl": timedelta(0)}, "positive"),
    ],
)
def test_init_rejects_bad_arguments(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"trust_domain": "example.org", **kwargs}
    trust_domain = args.pop("trust_domain")
    assert isinstance(trust_domain, str)
    with pytest.raises(ValueError, match=message):
        CertificateAuthority.init(tmp_path, trust_domain, **args)  # type: ignore[arg-type]
    assert not (tmp_path / "root.pem").exists()


def test_root_certificate(ca: CertificateAuthority) -> None:
    root = ca.root_certificate
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshlib"
    assert "example.org" in str(root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert spiffe_ids_of(root) == ["spiffe://example.org"]
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_load(ca: CertificateAuthority) -> None:
    loaded = CertificateAuthority.load(ca.directory)
    assert loaded.trust_domain == "example.org"
    assert loaded.trust_bundle_pem() == ca.trust_bundle_pem()
    assert loaded.intermediate_certificate is None
    verify_chain(ca, loaded.issue("users"))


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no CA in"):
        CertificateAuthority.load(tmp_path)
    CertificateAuthority.init(tmp_path / "a", "example.org")
    (tmp_path / "a" / "root.key").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        CertificateAuthority.load(tmp_path / "a")
    CertificateAuthority.init(tmp_path / "b", "example.org")
    (tmp_path / "a" / "root.key").chmod(0o600)
    (tmp_path / "b" / "root.key").write_bytes((tmp_path / "a" / "root.key").read_bytes())
    with pytest.raises(ValueError, match="is not the key of"):
        CertificateAuthority.load(tmp_path / "b")


def test_issued_leaf_profile(ca: CertificateAuthority) -> None:
    issued = ca.issue("users", ttl=timedelta(hours=2))
    assert issued.spiffe_id == USERS
    assert issued.cert_pem == issued.chain_pem  # no intermediate; the root is never included
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == ca.root_certificate.subject

    extensions = {ext.oid: ext for ext in leaf.extensions}
    assert len(extensions) == 6
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (usage.value.key_encipherment or usage.value.key_cert_sign or usage.value.crl_sign)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty (RFC 5280 4.2.1.6)
    assert list(san.value) == [x509.UniformResourceIdentifier(USERS)]
    assert spiffe_ids_of(leaf) == [USERS]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = ca.root_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == root_ski.value.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    assert 0 < leaf.serial_number < 2**159
    assert leaf.not_valid_before_utc == issued.not_before
    assert leaf.not_valid_after_utc == issued.not_after
    assert issued.not_after - issued.not_before == timedelta(hours=2, seconds=30)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert verify_chain(ca, issued)[-1] == ca.root_certificate


def test_each_issue_has_a_new_key_and_serial(ca: CertificateAuthority) -> None:
    a, b = ca.issue("users"), ca.issue("users")
    assert a.key_pem != b.key_pem
    serials = {x509.load_pem_x509_certificate(i.cert_pem).serial_number for i in (a, b)}
    assert len(serials) == 2


def test_rsa_leaf_allows_key_encipherment(ca: CertificateAuthority) -> None:
    issued = ca.issue("orders", namespace="shop", key_type="rsa-2048", not_before_skew=timedelta())
    assert issued.spiffe_id == "spiffe://example.org/ns/shop/sa/orders"
    assert b"BEGIN PRIVATE KEY" in issued.key_pem  # PKCS8, unencrypted
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert issued.not_after - issued.not_before == timedelta(hours=24)
    verify_chain(ca, issued)


def test_p384_ca_signs_with_sha384(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path, "example.org", key_type="ec-p384")
    leaf = x509.load_pem_x509_certificate(ca.issue("users").cert_pem)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA384)
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"


def test_lifetime_is_capped_by_the_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path, "example.org", ttl=timedelta(hours=1))
    issued = ca.issue("users", ttl=timedelta(days=7))
    assert issued.not_after == ca.root_certificate.not_valid_after_utc
    verify_chain(ca, issued)


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_ttl_must_be_positive(ca: CertificateAuthority, ttl: timedelta) -> None:
    with pytest.raises(ValueError, match="positive"):
        ca.issue("users", ttl=ttl)


def test_bad_service_names_are_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="invalid service"):
        ca.issue("../etc")
    with pytest.raises(ValueError, match="invalid namespace"):
        ca.issue("users", namespace="a b")


def test_intermediate_chain(ca_with_intermediate: CertificateAuthority) -> None:
    ca = ca_with_intermediate
    folder = ca.directory
    assert mode(folder / "intermediate.key") == 0o600
    assert mode(folder / "intermediate.pem") == 0o644
    root = ca.root_certificate
    inter = ca.intermediate_certificate
    assert inter is not None
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    constraints = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = inter.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    inter.verify_directly_issued_by(root)

    issued = ca.issue("users")
    chain = certs_of(issued.chain_pem)
    assert len(chain) == 2 and root not in chain
    assert chain[1] == inter
    assert issued.chain_pem.startswith(issued.cert_pem)
    chain[0].verify_directly_issued_by(inter)
    assert verify_chain(ca, issued) == [chain[0], inter, root]

    loaded = CertificateAuthority.load(folder)
    assert loaded.intermediate_certificate == inter
    assert verify_chain(ca, loaded.issue("orders"))[1] == inter


def test_issued_certificate_repr_hides_the_key(ca: CertificateAuthority) -> None:
    issued = ca.issue("users")
    for text in (repr(issued), str(issued), f"{issued!r}"):
        assert "PRIVATE KEY" not in text
        assert issued.key_pem.decode() not in text
        assert USERS in text


def test_write_issued(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue("users")
    cert_path, key_path = ca.write_issued(issued, tmp_path / "out")
    assert (cert_path.name, key_path.name) == ("users.pem", "users.key")
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    assert cert_path.read_bytes() == issued.chain_pem
    assert read_private(key_path) == issued.key_pem

    again = ca.issue("users")
    with pytest.raises(FileExistsError, match="users"):
        ca.write_issued(again, tmp_path / "out")
    assert read_private(key_path) == issued.key_pem
    ca.write_issued(again, tmp_path / "out", overwrite=True)
    assert read_private(key_path) == again.key_pem
    assert mode(key_path) == 0o600

    named = ca.write_issued(issued, tmp_path / "out", name="server")
    assert named == (tmp_path / "out" / "server.pem", tmp_path / "out" / "server.key")
    with pytest.raises(ValueError, match="bad file name"):
        ca.write_issued(issued, tmp_path, name="../x")


# -- a real mTLS handshake ---------------------------------------------------------


def _context(
    server_side: bool, ca: CertificateAuthority, files: tuple[Path, Path] | None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=ca.trust_bundle_pem().decode())
    context.verify_mode = ssl.CERT_REQUIRED
    if not server_side:
        # identity is the SPIFFE ID in the URI SAN, never a hostname
        context.check_hostname = False
    if files is not None:
        context.load_cert_chain(files[0], files[1])
    return context


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[list[str], list[str], BaseException | None]:
    """Run one mTLS exchange over a socket pair; return the IDs each side saw of the other."""
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(5)
    client_sock.settimeout(5)
    seen: dict[str, list[str]] = {}
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(server_sock, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                seen["server"] = spiffe_ids_of(x509.load_der_x509_certificate(der))
                tls.sendall(b"ok")
        except BaseException as exc:
            failure.append(exc)
            server_sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client.wrap_socket(client_sock) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            seen["client"] = spiffe_ids_of(x509.load_der_x509_certificate(der))
            assert tls.recv(2) == b"ok"
    except (ssl.SSLError, OSError) as exc:
        if not failure:
            failure.append(exc)
    finally:
        client_sock.close()
        thread.join(5)
    return seen.get("server", []), seen.get("client", []), failure[0] if failure else None


@pytest.mark.parametrize("intermediate", [False, True])
def test_mtls_handshake(
    ca: CertificateAuthority,
    ca_with_intermediate: CertificateAuthority,
    tmp_path: Path,
    intermediate: bool,
) -> None:
    authority = ca_with_intermediate if intermediate else ca
    server_files = authority.write_issued(authority.issue("users"), tmp_path)
    client_files = authority.write_issued(authority.issue("frontend", namespace="web"), tmp_path)
    server = _context(True, authority, server_files)
    client = _context(False, authority, client_files)
    server_saw, client_saw, failure = _handshake(server, client)
    assert failure is None
    assert server_saw == ["spiffe://example.org/ns/web/sa/frontend"]
    assert client_saw == [USERS]


def test_mtls_rejects_a_client_of_another_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", "example.org")
    server_files = ca.write_issued(ca.issue("users"), tmp_path)
    client_files = other.write_issued(other.issue("frontend"), tmp_path)
    server = _context(True, ca, server_files)
    client = _context(False, ca, client_files)
    server_saw, _, failure = _handshake(server, client)
    assert isinstance(failure, ssl.SSLError | OSError)
    assert server_saw == []


def test_mtls_requires_a_client_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    server_files = ca.write_issued(ca.issue("users"), tmp_path)
    server = _context(True, ca, server_files)
    client = _context(False, ca, None)
    server_saw, _, failure = _handshake(server, client)
    assert isinstance(failure, ssl.SSLError | OSError)
    assert server_saw == []


# -- the command line --------------------------------------------------------------


def test_cli_ca_init_issue_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ca"
    assert main(["ca", "init", "--trust-domain", "example.org", "--dir", str(folder)]) == 0
    assert "spiffe://example.org" in capsys.readouterr().out
    assert mode(folder / "root.key") == 0o600

    assert main(["ca", "init", "--trust-domain", "example.org", "--dir", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "already exists" in captured.err and "Traceback" not in captured.err

    assert main(["cert", "issue", "--service", "users", "--ttl", "2h", "--dir", str(folder)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert USERS in line
    assert str(folder / "users.pem") in line and str(folder / "users.key") in line
    assert mode(folder / "users.key") == 0o600
    leaf = x509.load_pem_x509_certificate((folder / "users.pem").read_bytes())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=2, seconds=30)
    assert leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") in line

    assert main(["cert", "issue", "--service", "users", "--dir", str(folder)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    issue_again = ["cert", "issue", "--service", "users", "--dir", str(folder), "--overwrite"]
    assert main(issue_again) == 0
    capsys.readouterr()

    out = tmp_path / "certs"
    issue_api = ["cert", "issue", "--service", "api", "--namespace", "shop", "--dir", str(folder)]
    assert main([*issue_api, "--out", str(out)]) == 0
    assert "spiffe://example.org/ns/shop/sa/api" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["api.key", "api.pem"]

    assert main(["ca", "bundle", "--dir", str(folder)]) == 0
    assert capsys.readouterr().out == (folder / "root.pem").read_text()
    bundle = tmp_path / "bundle.pem"
    assert main(["ca", "bundle", "--dir", str(folder), "--out", str(bundle)]) == 0
    assert bundle.read_bytes() == (folder / "root.pem").read_bytes()
    assert mode(bundle) == 0o644
    capsys.readouterr()
    assert main(["ca", "bundle", "--dir", str(folder), "--out", str(bundle)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_cli_init_with_intermediate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["ca", "init", "--trust-domain", "example.org", "--dir", str(tmp_path), "--intermediate"]
    assert main([*args, "--key-type", "ec-p384", "--ttl", "720h"]) == 0
    assert "intermediate.pem" in capsys.readouterr().out
    ca = CertificateAuthority.load(tmp_path)
    assert ca.intermediate_certificate is not None
    root = ca.root_certificate
    assert root.not_valid_after_utc - root.not_valid_before_utc == timedelta(hours=720, seconds=30)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ca", "init", "--trust-domain", "Bad_Domain", "--dir", "{d}/x"], "invalid trust domain"),
        (["ca", "init", "--trust-domain", "example.org", "--dir", "{d}/x", "--ttl", "1y"], "--ttl"),
        (["ca", "init", "--trust-domain", "example.org", "--dir", "{d}/x", "--ttl", "0s"], "ttl"),
        (["cert", "issue", "--service", "users", "--dir", "{d}/missing"], "no CA in"),
        (["ca", "bundle", "--dir", "{d}/missing"], "no CA in"),
    ],
)
def test_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main([arg.replace("{d}", str(tmp_path)) for arg in argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_bad_duration_for_cert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CertificateAuthority.init(tmp_path, "example.org")
    assert main(["cert", "issue", "--service", "users", "--dir", str(tmp_path), "--ttl", "x"]) == 1
    assert "bad duration" in capsys.readouterr().err
    assert not (tmp_path / "users.key").exists()
