"""TLS contexts for mesh connections, and the peer identity check.

Endpoints are IP addresses and service names are logical, so hostname checks
mean nothing here: a client verifies the server's chain against the trust
bundle, then checks the SPIFFE ID in its URI SAN against the identity the policy
expects for the service. TLS 1.2 is the minimum; TLS 1.3 is negotiated whenever
both sides have it.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

import httpx

from meshlib.errors import MeshError
from meshlib.tls.identity import spiffe_matches, svid_id


class PeerIdentityError(MeshError, httpx.ConnectError):
    """The peer's certificate is valid but names another workload than expected.

    A connect error: the request was never sent, so it may go to another endpoint."""


def client_context(cert_file: Path, key_file: Path, bundle_file: Path) -> ssl.SSLContext:
    """A client context presenting the workload certificate and trusting the bundle."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # identities are SPIFFE URIs, checked by verify_peer
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(bundle_file))
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def server_context(
    cert_file: Path, key_file: Path, bundle_file: Path, *, require_client_cert: bool
) -> ssl.SSLContext:
    """A server context with the workload certificate; client certificates are
    required (strict) or only requested and verified when sent (permissive)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    context.load_verify_locations(cafile=str(bundle_file))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The SPIFFE ID of the verified peer certificate, or "" if there is none.

    A certificate with several SPIFFE IDs is no valid SVID and yields "".
    """
    if ssl_object is None:
        return ""
    der = ssl_object.getpeercert(True)  # positional: httpcore hands over the C-level object
    return svid_id(der, der=True) if der else ""


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None, service: str, expected: Mapping[str, str]
) -> str:
    """Check the server's SPIFFE ID against what ``expected[service]`` allows
    (an exact ID or a pattern with wildcards); returns the ID, raises PeerIdentityError."""
    pattern = expected.get(service)
    peer = peer_spiffe_id(ssl_object)
    if pattern is None:
        raise PeerIdentityError(f"no expected identity for mesh service {service!r}")
    if not peer or not spiffe_matches(pattern, peer):
        raise PeerIdentityError(
            f"endpoint of {service!r} presented identity {peer or '(none)'!r}, expected "
            f"{pattern!r}: refusing to send (set `services.{service}.tls.identity` if the "
            "service runs under another identity)"
        )
    return peer
