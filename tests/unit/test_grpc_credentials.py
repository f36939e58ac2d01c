"""gRPC credentials from the workload identity, against real gRPC servers on loopback.

grpcio's client checks the server certificate's DNS/IP SANs and ignores URI SANs,
so servers that grpc clients call here carry a DNS SAN ("localhost") besides their
SPIFFE ID; the mesh-issued, URI-only case is covered by its own tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlib.tls.ca import CertificateAuthority
from meshlib.tls.contexts import client_context
from meshlib.tls.contexts import peer_spiffe_id as ssl_peer_spiffe_id
from meshlib.tls.grpc_credentials import channel_credentials, peer_spiffe_id, server_credentials
from meshlib.tls.keyfiles import read_private, write_private, write_public
from meshlib.tls.provider import FileSource, IdentityProvider, LocalCASource

SERVER_ID = "spiffe://example.org/ns/default/sa/server"
CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
METHOD = "/test.Echo/Who"
# the server certificates below name "localhost"; dialing 127.0.0.1 avoids resolving it
CLIENT_OPTIONS = (
    ("grpc.ssl_target_name_override", "localhost"),
    # a fresh connection per channel: a shared subchannel would skip the handshake
    ("grpc.use_local_subchannel_pool", 1),
)


def _raw(data: bytes) -> bytes:
    return data


@dataclass
class Served:
    port: int
    seen: list[str]  # peer_spiffe_id of each call the handler answered

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def serve(credentials: grpc.ServerCredentials) -> Iterator[Served]:
    seen: list[str] = []

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        peer = peer_spiffe_id(context)
        seen.append(peer)
        return peer.encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Who": grpc.unary_unary_rpc_method_handler(
                who, request_deserializer=_raw, response_serializer=_raw
            )
        },
    )
    executor = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(executor)
    server.add_generic_rpc_handlers([handler])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield Served(port, seen)
    finally:
        server.stop(None).wait(5)
        executor.shutdown(wait=True)


def call(channel: grpc.Channel) -> bytes:
    stub = channel.unary_unary(METHOD, request_serializer=_raw, response_deserializer=_raw)
    return cast(bytes, stub(b"", timeout=5))


def call_once(
    target: str, credentials: grpc.ChannelCredentials, options: Any = CLIENT_OPTIONS
) -> bytes:
    with grpc.secure_channel(target, credentials, options=options) as channel:
        return call(channel)


def refused(
    target: str, credentials: grpc.ChannelCredentials, options: Any = CLIENT_OPTIONS
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call_once(target, credentials, options)
    error = cast(grpc.RpcError, info.value)
    assert cast(grpc.Call, error).code() == grpc.StatusCode.UNAVAILABLE
    return error


def _load_root(ca: CertificateAuthority) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(read_private(ca.directory / "root.key"), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def write_server_files(ca: CertificateAuthority, folder: Path, bundle_pem: bytes) -> None:
    """A server certificate from ``ca`` with its SPIFFE ID and a DNS SAN grpc clients accept."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SERVER_ID), x509.DNSName("localhost")]
            ),
            critical=True,
        )
        .sign(_load_root(ca), hashes.SHA256())
    )
    folder.mkdir(mode=0o700, exist_ok=True)
    write_public(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM), True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(folder / "server.key", key_pem, overwrite=True)
    write_public(folder / "bundle.pem", bundle_pem, overwrite=True)


def file_identity(folder: Path) -> IdentityProvider:
    source = FileSource(folder / "server.pem", folder / "server.key", folder / "bundle.pem")
    return IdentityProvider(source, background=False)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", "example.org")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "other-ca", "example.org")


@pytest.fixture
def closing() -> Iterator[Callable[[IdentityProvider], IdentityProvider]]:
    providers: list[IdentityProvider] = []

    def track(provider: IdentityProvider) -> IdentityProvider:
        providers.append(provider)
        return provider

    yield track
    for provider in providers:
        provider.close()


@pytest.fixture
def client(
    ca: CertificateAuthority, closing: Callable[[IdentityProvider], IdentityProvider]
) -> IdentityProvider:
    return closing(IdentityProvider(LocalCASource(ca.directory, "client"), background=False))


@pytest.fixture
def server(
    ca: CertificateAuthority,
    tmp_path: Path,
    closing: Callable[[IdentityProvider], IdentityProvider],
) -> IdentityProvider:
    write_server_files(ca, tmp_path / "server", ca.trust_bundle_pem())
    return closing(file_identity(tmp_path / "server"))


def test_mtls_call_reaches_the_server_with_the_client_spiffe_id(
    server: IdentityProvider, client: IdentityProvider
) -> None:
    with serve(server_credentials(server)) as served:
        assert call_once(served.target, channel_credentials(client)) == CLIENT_ID.encode()
        assert served.seen == [CLIENT_ID]


def test_client_without_certificate_is_rejected(
    server: IdentityProvider, client: IdentityProvider
) -> None:
    anonymous = grpc.ssl_channel_credentials(root_certificates=client.credentials().bundle_pem)
    with serve(server_credentials(server)) as served:
        refused(served.target, anonymous)
        assert served.seen == []


def test_client_from_another_ca_is_rejected(
    server: IdentityProvider,
    client: IdentityProvider,
    other_ca: CertificateAuthority,
    closing: Callable[[IdentityProvider], IdentityProvider],
) -> None:
    stranger = closing(
        IdentityProvider(LocalCASource(other_ca.directory, "client"), background=False)
    )
    mine = stranger.credentials()
    # trusts the server's CA, so only the server can be the one refusing
    credentials = grpc.ssl_channel_credentials(
        root_certificates=client.credentials().bundle_pem,
        private_key=mine.key_pem,
        certificate_chain=mine.chain_pem,
    )
    with serve(server_credentials(server)) as served:
        refused(served.target, credentials)
        assert served.seen == []


def test_without_client_auth_grpc_does_not_ask_for_a_client_certificate(
    server: IdentityProvider, client: IdentityProvider
) -> None:
    anonymous = grpc.ssl_channel_credentials(root_certificates=client.credentials().bundle_pem)
    with serve(server_credentials(server, require_client_auth=False)) as served:
        assert call_once(served.target, anonymous) == b""
        assert call_once(served.target, channel_credentials(client)) == b""
        assert served.seen == ["", ""]


def test_new_handshakes_get_the_rotated_server_certificate_without_a_restart(
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    client: IdentityProvider,
    tmp_path: Path,
    closing: Callable[[IdentityProvider], IdentityProvider],
) -> None:
    # generation 1 is signed by ``ca``, generation 2 by ``other_ca``: which CA a fresh
    # client must trust tells which certificate its handshake got
    both = ca.trust_bundle_pem() + other_ca.trust_bundle_pem()
    folder = tmp_path / "server"
    write_server_files(ca, folder, both)
    server = closing(file_identity(folder))
    trusts_old = channel_credentials(client)
    mine = client.credentials()
    trusts_new = grpc.ssl_channel_credentials(
        root_certificates=other_ca.trust_bundle_pem(),
        private_key=mine.key_pem,
        certificate_chain=mine.chain_pem,
    )
    with (
        serve(server_credentials(server)) as served,
        grpc.secure_channel(served.target, trusts_old, options=CLIENT_OPTIONS) as open_one,
    ):
        assert call(open_one) == CLIENT_ID.encode()
        refused(served.target, trusts_new)

        write_server_files(other_ca, folder, both)
        assert server.refresh().generation == 2

        assert call_once(served.target, trusts_new) == CLIENT_ID.encode()
        refused(served.target, trusts_old)
        # an established connection keeps the certificate it was opened with
        assert call(open_one) == CLIENT_ID.encode()


def served_certificate(port: int, client: IdentityProvider) -> tuple[bytes, str]:
    """The leaf a TLS handshake with the gRPC server gets, and its verified SPIFFE ID."""
    mine = client.credentials()
    # a context of our own: the provider's cached one is shared and must stay untouched
    context = client_context(mine.cert_file, mine.key_file, mine.bundle_file)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der, ssl_peer_spiffe_id(tls)


def leaf_der(identity: IdentityProvider) -> bytes:
    leaf = x509.load_pem_x509_certificate(identity.credentials().chain_pem)
    return leaf.public_bytes(serialization.Encoding.DER)


def test_mesh_issued_server_certificate_rotates_without_a_restart(
    ca: CertificateAuthority,
    client: IdentityProvider,
    closing: Callable[[IdentityProvider], IdentityProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # URI-only certificates: probed with Python's ssl, which checks SPIFFE IDs itself
    server = closing(IdentityProvider(LocalCASource(ca.directory, "server"), background=False))
    caplog.set_level(logging.INFO, logger="meshlib.tls")
    with serve(server_credentials(server)) as served:
        first = leaf_der(server)
        assert served_certificate(served.port, client) == (first, SERVER_ID)
        assert served_certificate(served.port, client)[0] == first

        server.refresh()
        second = leaf_der(server)
        assert second != first
        assert served_certificate(served.port, client) == (second, SERVER_ID)
        assert served_certificate(served.port, client)[0] == second

    reloads = [r for r in caplog.records if "new handshakes use" in r.getMessage()]
    assert len(reloads) == 1  # the fetcher hands grpc a new configuration only on rotation


def test_grpc_client_cannot_verify_a_uri_only_server_certificate(
    ca: CertificateAuthority,
    client: IdentityProvider,
    closing: Callable[[IdentityProvider], IdentityProvider],
) -> None:
    # documents the limitation: grpc's hostname check ignores URI SANs, even when the
    # target name is overridden with the very SPIFFE ID the certificate carries
    server = closing(IdentityProvider(LocalCASource(ca.directory, "server"), background=False))
    local_pool = ("grpc.use_local_subchannel_pool", 1)
    with serve(server_credentials(server)) as served:
        for options in [
            (local_pool,),
            (local_pool, ("grpc.ssl_target_name_override", SERVER_ID)),
        ]:
            error = refused(served.target, channel_credentials(client), options)
            assert "Hostname Verification" in cast(grpc.Call, error).details()
        assert served.seen == []


class FakeContext:
    def __init__(self, auth: dict[str, Any]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, Any]:
        return self._auth


def _pem_with_sans(*uris: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({}, ""),
        ({"x509_pem_cert": []}, ""),
        ({"x509_pem_cert": [b"not a certificate"]}, ""),
        ({"x509_pem_cert": [_pem_with_sans(CLIENT_ID, SERVER_ID)]}, ""),
        ({"x509_pem_cert": [_pem_with_sans("https://example.org/")]}, ""),
        ({"x509_pem_cert": [_pem_with_sans(CLIENT_ID)]}, CLIENT_ID),
        ({"x509_pem_cert": _pem_with_sans(CLIENT_ID)}, CLIENT_ID),  # bytes, as the stubs say
    ],
)
def test_peer_spiffe_id_accepts_only_a_single_parsable_svid(
    auth: dict[str, Any], expected: str
) -> None:
    assert peer_spiffe_id(cast(grpc.ServicerContext, FakeContext(auth))) == expected


def test_peer_spiffe_id_with_an_aio_server(
    server: IdentityProvider, client: IdentityProvider
) -> None:
    async def who(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return peer_spiffe_id(context).encode()

    async def scenario() -> bytes:
        aio_server = grpc.aio.server()
        aio_server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Echo",
                    {
                        "Who": grpc.unary_unary_rpc_method_handler(
                            who, request_deserializer=_raw, response_serializer=_raw
                        )
                    },
                )
            ]
        )
        port = aio_server.add_secure_port("127.0.0.1:0", server_credentials(server))
        await aio_server.start()
        try:
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", channel_credentials(client), options=CLIENT_OPTIONS
            ) as channel:
                stub = channel.unary_unary(
                    METHOD, request_serializer=_raw, response_deserializer=_raw
                )
                return cast(bytes, await stub(b"", timeout=5))
        finally:
            await aio_server.stop(None)

    assert asyncio.run(scenario()) == CLIENT_ID.encode()
