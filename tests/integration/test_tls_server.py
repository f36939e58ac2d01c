"""Mesh mTLS server: real handshakes on 127.0.0.1 with a throwaway CA.

Each test starts its own server on an ephemeral port; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlib.tls.server import MODES, MeshServer, RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TRUST_DOMAIN = "spiffe://example.org"
USERS = f"{TRUST_DOMAIN}/ns/default/sa/users"
FRONTEND = f"{TRUST_DOMAIN}/ns/default/sa/frontend"
TIMEOUT = 5.0
# the ways a client sees a peer or a port that refuses it, depending on when it hears so
REFUSED = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


# -- a throwaway CA ------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """PEM files of one certificate and its key."""

    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)


class CA:
    """An EC P-256 root that issues SPIFFE leaf certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = directory / f"{name}-ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, spiffe_id: str, file_name: str) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            # SPIFFE X.509-SVID: the identity is the URI SAN, the subject may be empty
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        identity = Identity(
            cert=self.directory / f"{file_name}.pem", key=self.directory / f"{file_name}-key.pem"
        )
        identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        identity.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return identity


@dataclass(frozen=True)
class PKI:
    ca: CA
    server: Identity
    server_rotated: Identity
    client: Identity
    stranger: Identity
    """A client certificate from another CA."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = CA(directory, "mesh")
    other = CA(directory, "other")
    return PKI(
        ca=ca,
        server=ca.issue(USERS, "users"),
        server_rotated=ca.issue(USERS, "users-rotated"),
        client=ca.issue(FRONTEND, "frontend"),
        stranger=other.issue(FRONTEND, "stranger"),
    )


def server_context(pki: PKI, identity: Identity, *, require: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(identity.cert, identity.key)
    ctx.load_verify_locations(pki.ca.pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    return ctx


def client_context(
    pki: PKI,
    identity: Identity | None,
    *,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = maximum
    # identities are SPIFFE URIs, not host names; the chain is still verified
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.ca.pem)
    if identity is not None:
        ctx.load_cert_chain(identity.cert, identity.key)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


def uri_sans(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def peer_der(response: httpx.Response) -> bytes:
    """The server certificate a response came over (while its client is open)."""
    sock = response.extensions["network_stream"].get_extra_info("socket")
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def assert_closed_by_server(sock: socket.socket) -> None:
    """The server closed (FIN) or aborted (RST) the connection (within the socket timeout)."""
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return
    assert data == b""


# -- the app and servers -------------------------------------------------------------------


class EchoApp:
    """Answers with what the server told it about the connection."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.calls += 1
        seen = {
            "scheme": scope["scheme"],
            "tls": scope.get("extensions", {}).get("tls"),
            "client": list(scope["client"]),
        }
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(seen)})
            await send({"type": "websocket.close"})
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen["received"] = len(body)
        seen["sha256"] = hashlib.sha256(body).hexdigest()
        payload = json.dumps(seen).encode()
        if scope["path"] == "/big":
            payload = b"x" * (2 * 1024 * 1024)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class AsyncioServer:
    """A server run through ``MeshServer.serve()`` on a stock asyncio loop."""

    def __init__(self, server: MeshServer) -> None:
        self.server = server
        self.port = server.port
        self.thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()


Server = RunningServer | AsyncioServer
StartServer = Callable[..., Server]


@pytest.fixture
def start() -> Iterator[StartServer]:
    """``start(app, mode, server_context, loop="auto" | "asyncio", **options)``."""
    started: list[Server] = []

    def _start(
        app: Any,
        mode: str,
        context: Callable[[], ssl.SSLContext] | None,
        *,
        loop: str = "auto",
        **options: Any,
    ) -> Server:
        server: Server
        if loop == "asyncio":
            server = AsyncioServer(
                MeshServer(
                    app, host="127.0.0.1", port=0, mode=mode, server_context=context, **options
                )
            )
        else:
            server = MeshServer(
                app, host="127.0.0.1", port=0, mode=mode, server_context=context, **options
            ).start_in_thread()
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


def https(server: Server, path: str = "/") -> str:
    return f"https://127.0.0.1:{server.port}{path}"


def http(server: Server, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


# -- strict ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maximum", "version"),
    [(ssl.TLSVersion.TLSv1_3, 0x0304), (ssl.TLSVersion.TLSv1_2, 0x0303)],
    ids=["tls1.3", "tls1.2"],
)
def test_strict_mtls_request_sees_the_client_identity(
    pki: PKI, start: StartServer, maximum: ssl.TLSVersion, version: int
) -> None:
    server = start(EchoApp(), "strict", lambda: server_context(pki, pki.server))
    ctx = client_context(pki, pki.client, maximum=maximum)
    with httpx.Client(verify=ctx, timeout=TIMEOUT) as client:
        response = client.post(https(server), content=b"hello")
        assert peer_der(response) == pki.server.der
    assert response.status_code == 200
    seen = response.json()
    assert seen["scheme"] == "https"
    assert seen["received"] == 5
    tls = seen["tls"]
    assert set(tls) == {
        "server_cert",
        "client_cert_chain",
        "client_cert_name",
        "client_cert_error",
        "tls_version",
        "cipher_suite",
    }
    assert len(tls["client_cert_chain"]) == 1
    assert uri_sans(tls["client_cert_chain"][0]) == [FRONTEND]
    assert tls["client_cert_chain"][0] == pki.client.cert.read_text()
    assert tls["client_cert_name"] == ""  # an SVID's empty subject, in RFC 4514
    assert tls["client_cert_error"] is None
    assert tls["server_cert"] is None
    assert tls["tls_version"] == version
    assert isinstance(tls["cipher_suite"], int)
    if version == 0x0304:
        assert tls["cipher_suite"] in {0x1301, 0x1302, 0x1303}
    else:
        assert tls["cipher_suite"] >> 8 == 0xC0  # an ECDHE suite


def test_strict_rejects_a_client_without_certificate(pki: PKI, start: StartServer) -> None:
    app = EchoApp()
    server = start(app, "strict", lambda: server_context(pki, pki.server))
    with (
        httpx.Client(verify=client_context(pki, None), timeout=TIMEOUT) as client,
        pytest.raises(REFUSED),
    ):
        client.get(https(server))
    assert app.calls == 0


def test_strict_rejects_plaintext(pki: PKI, start: StartServer) -> None:
    app = EchoApp()
    server = start(app, "strict", lambda: server_context(pki, pki.server))
    with httpx.Client(timeout=TIMEOUT) as client, pytest.raises(REFUSED):
        client.get(http(server))
    assert app.calls == 0


def test_strict_rejects_a_certificate_from_another_ca(pki: PKI, start: StartServer) -> None:
    app = EchoApp()
    server = start(app, "strict", lambda: server_context(pki, pki.server))
    ctx = client_context(pki, pki.stranger)
    with httpx.Client(verify=ctx, timeout=TIMEOUT) as client, pytest.raises(REFUSED):
        client.get(https(server))
    assert app.calls == 0


def test_strict_refuses_a_context_that_does_not_require_client_certificates(
    pki: PKI, start: StartServer
) -> None:
    app = EchoApp()
    server = start(app, "strict", lambda: server_context(pki, pki.server, require=False))
    with (
        httpx.Client(verify=client_context(pki, None), timeout=TIMEOUT) as client,
        pytest.raises(REFUSED),
    ):
        client.get(https(server))
    assert app.calls == 0


def test_large_bodies_both_ways_over_tls(pki: PKI, start: StartServer) -> None:
    server = start(EchoApp(), "strict", lambda: server_context(pki, pki.server))
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB: fills buffers, so flow control kicks in
    with httpx.Client(verify=client_context(pki, pki.client), timeout=TIMEOUT) as client:
        sent = client.post(https(server), content=body).json()
        big = client.get(https(server, "/big"))
    assert sent["received"] == len(body)
    assert sent["sha256"] == hashlib.sha256(body).hexdigest()
    assert big.content == b"x" * (2 * 1024 * 1024)


def test_websocket_over_mtls_gets_the_extension(pki: PKI, start: StartServer) -> None:
    sync_client = pytest.importorskip("websockets.sync.client")
    server = start(EchoApp(), "strict", lambda: server_context(pki, pki.server))
    uri = f"wss://127.0.0.1:{server.port}/ws"
    with sync_client.connect(uri, ssl=client_context(pki, pki.client), open_timeout=TIMEOUT) as ws:
        seen = json.loads(ws.recv(timeout=TIMEOUT))
    assert seen["scheme"] == "wss"
    assert uri_sans(seen["tls"]["client_cert_chain"][0]) == [FRONTEND]


# -- permissive --------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_permissive_serves_tls_and_plaintext_on_one_port(
    pki: PKI, start: StartServer, loop: str
) -> None:
    server = start(
        EchoApp(), "permissive", lambda: server_context(pki, pki.server, require=False), loop=loop
    )
    with httpx.Client(timeout=TIMEOUT) as client:
        plain = client.post(http(server), content=b"plain").json()
    with httpx.Client(verify=client_context(pki, pki.client), timeout=TIMEOUT) as client:
        mtls = client.post(https(server), content=b"secret").json()
        again = client.get(https(server)).json()
    with httpx.Client(verify=client_context(pki, None), timeout=TIMEOUT) as client:
        anonymous = client.get(https(server)).json()

    assert plain["scheme"] == "http"
    assert plain["tls"] is None
    assert plain["received"] == 5  # the sniffed bytes reached the app

    assert mtls["scheme"] == "https"
    assert mtls["received"] == 6
    assert uri_sans(mtls["tls"]["client_cert_chain"][0]) == [FRONTEND]
    assert again["client"] == mtls["client"]  # same keep-alive connection, same identity
    assert again["tls"] == mtls["tls"]

    # the context only requests a certificate: TLS without one, and no identity
    assert anonymous["scheme"] == "https"
    assert anonymous["tls"]["client_cert_chain"] == []
    assert anonymous["tls"]["client_cert_name"] is None


def test_permissive_still_rejects_a_certificate_from_another_ca(
    pki: PKI, start: StartServer
) -> None:
    app = EchoApp()
    server = start(app, "permissive", lambda: server_context(pki, pki.server, require=False))
    ctx = client_context(pki, pki.stranger)
    with httpx.Client(verify=ctx, timeout=TIMEOUT) as client, pytest.raises(REFUSED):
        client.get(https(server))
    assert app.calls == 0


def test_idle_connections_are_closed_after_the_sniff_timeout(pki: PKI, start: StartServer) -> None:
    server = start(
        EchoApp(),
        "permissive",
        lambda: server_context(pki, pki.server, require=False),
        loop="asyncio",
        handshake_timeout=0.3,
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        started = time.monotonic()
        assert_closed_by_server(sock)
        assert time.monotonic() - started < 3


# -- disabled ----------------------------------------------------------------------------


def test_disabled_is_plain_http(pki: PKI, start: StartServer) -> None:
    app = EchoApp()
    server = start(app, "disabled", None)
    with httpx.Client(timeout=TIMEOUT) as client:
        plain = client.get(http(server)).json()
    assert plain["scheme"] == "http"
    assert plain["tls"] is None
    with (
        httpx.Client(verify=client_context(pki, pki.client), timeout=TIMEOUT) as client,
        pytest.raises(REFUSED),
    ):
        client.get(https(server))
    assert app.calls == 1


def test_modes_are_checked() -> None:
    assert MODES == ("strict", "permissive", "disabled")
    with pytest.raises(ValueError, match="mode"):
        MeshServer(EchoApp(), host="127.0.0.1", port=0, mode="mtls", server_context=None)
    with pytest.raises(ValueError, match="server_context"):
        MeshServer(EchoApp(), host="127.0.0.1", port=0, mode="strict", server_context=None)


# -- rotation and stopping ---------------------------------------------------------------


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_a_rotated_certificate_applies_to_new_connections(
    pki: PKI, start: StartServer, loop: str
) -> None:
    contexts = {
        "old": server_context(pki, pki.server),
        "new": server_context(pki, pki.server_rotated),
    }
    current = ["old"]
    calls: list[str] = []

    def context() -> ssl.SSLContext:
        calls.append(current[0])
        return contexts[current[0]]

    server = start(EchoApp(), "strict", context, loop=loop)
    ctx = client_context(pki, pki.client)
    with httpx.Client(verify=ctx, timeout=TIMEOUT) as kept:
        first = kept.get(https(server))
        assert peer_der(first) == pki.server.der

        current[0] = "new"
        with httpx.Client(verify=ctx, timeout=TIMEOUT) as fresh:
            rotated = fresh.get(https(server))
            assert peer_der(rotated) == pki.server_rotated.der
        assert uri_sans(rotated.json()["tls"]["client_cert_chain"][0]) == [FRONTEND]

        # a raw handshake agrees
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            assert tls.getpeercert(binary_form=True) == pki.server_rotated.der

        second = kept.get(https(server))
        assert second.status_code == 200
        assert second.json()["client"] == first.json()["client"]  # the same connection
        assert peer_der(second) == pki.server.der
    assert calls == ["old", "new", "new"]
    # every connection is closed now: none of them is remembered
    tls_by_connection = server.server._connections.tls
    deadline = time.monotonic() + TIMEOUT
    while tls_by_connection:
        assert time.monotonic() < deadline, f"TLS info left behind: {tls_by_connection}"
        time.sleep(0.01)


def test_a_failed_startup_raises_and_closes_the_port(pki: PKI) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    server = MeshServer(
        app,
        host="127.0.0.1",
        port=0,
        mode="strict",
        server_context=lambda: server_context(pki, pki.server),
        log_level="critical",
    )
    port = server.port
    with pytest.raises(RuntimeError, match="failed to start"):
        server.start_in_thread()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    assert not [t for t in threading.enumerate() if t.name.startswith("meshlib-server")]


def test_stop_closes_the_port_and_leaves_no_thread(pki: PKI) -> None:
    server = MeshServer(
        EchoApp(),
        host="127.0.0.1",
        port=0,
        mode="permissive",
        server_context=lambda: server_context(pki, pki.server, require=False),
    ).start_in_thread()
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    with httpx.Client(verify=client_context(pki, pki.client), timeout=TIMEOUT) as client:
        assert client.get(https(server)).status_code == 200
        server.stop()
        with pytest.raises(REFUSED):
            client.get(https(server))
    # the connection that never sent a byte was dropped too
    with idle:
        assert_closed_by_server(idle)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT).close()
    assert not [t for t in threading.enumerate() if t.name.startswith("meshlib-server")]
