"""gRPC channel and server credentials built from the workload identity.

Server side: complete. :func:`server_credentials` serves the identity's current
certificate and verifies client certificates against its trust bundle; a rotated
certificate is picked up by the next handshake, without restarting the server.
Servicers read the caller's identity with :func:`peer_spiffe_id` and authorize it
(for instance with :func:`meshlib.tls.identity.spiffe_matches`).

Client side: limited, because grpcio cannot verify a SPIFFE server certificate.
After checking the chain, gRPC's client always runs a hostname check that looks only
at the server certificate's DNS and IP SANs (and its CN when there are no DNS SANs),
never at URI SANs. Workload certificates from :mod:`meshlib.tls.ca` carry only a
URI SAN, so a handshake with a mesh server fails with UNAVAILABLE ("Hostname
Verification Check failed"), whatever the target is and even with
``grpc.ssl_target_name_override`` set to the server's SPIFFE ID. Python's grpcio
offers no way around this: ``ssl_channel_credentials`` takes no verification
options (the C/C++ TLS credentials' custom verifiers are not exposed), and a client
call never sees the server's certificate, so no interceptor can check it either.
``xds_channel_credentials`` could match URI SANs, but only with SAN matchers sent
by an xDS control plane, which meshlib does not run.

:func:`channel_credentials` therefore suits servers whose certificate names the
host the channel dials (a DNS SAN matching the target or
``grpc.ssl_target_name_override``): the client presents its SPIFFE certificate and
checks the server's chain against the mesh trust bundle and its DNS name, not its
SPIFFE ID. With a mesh-issued, URI-only server certificate, it fails closed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

import grpc

from meshlib.tls.identity import svid_id
from meshlib.tls.provider import Credentials, IdentityProvider

log = logging.getLogger("meshlib.tls")

_PEER_CERT_KEY = "x509_pem_cert"

AnyServicerContext = grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]


def channel_credentials(identity: IdentityProvider) -> grpc.ChannelCredentials:
    """Client credentials from the identity's current certificate, key and bundle.

    The server is verified by chain and hostname only (see the module docstring):
    its SPIFFE ID is not checked. A channel keeps the credentials it was built
    with, also when it reconnects: after a rotation it still presents the old
    certificate, and its reconnects fail once that has expired. Build a new channel
    per generation, e.g.::

        generation = identity.credentials().generation
        if generation != built_for:
            old = channel
            channel = grpc.secure_channel(target, channel_credentials(identity))
            built_for = generation
            old.close()  # or close it once its in-flight calls are done
    """
    current = identity.credentials()
    return grpc.ssl_channel_credentials(
        root_certificates=current.bundle_pem,
        private_key=current.key_pem,
        certificate_chain=current.chain_pem,
    )


def _configuration(credentials: Credentials) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(credentials.key_pem, credentials.chain_pem)],
        root_certificates=credentials.bundle_pem,
    )


class _CertificateFetcher:
    """Called by gRPC before each new handshake: a new configuration when the
    identity has rotated since the last call, None (keep the current one) otherwise."""

    def __init__(self, identity: IdentityProvider, generation: int) -> None:
        self._identity = identity
        self._generation = generation
        self._lock = threading.Lock()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            current = self._identity.credentials()
        except Exception:
            # runs in the handshake path: keep serving the current certificate
            log.exception("gRPC server: could not read the workload identity")
            return None
        with self._lock:
            if current.generation == self._generation:
                return None
            self._generation = current.generation
        log.info(
            "gRPC server: new handshakes use %s generation %d",
            current.spiffe_id,
            current.generation,
        )
        return _configuration(current)


def server_credentials(
    identity: IdentityProvider, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server credentials that follow the identity's rotations without a restart.

    With ``require_client_auth``, clients must present a certificate that chains
    to the trust bundle. Without it, gRPC does not even request a client certificate
    (unlike the permissive ``ssl`` server context), so :func:`peer_spiffe_id` is
    always "". Build one per ``add_secure_port`` call: gRPC tracks the served
    configuration per credentials object.
    """
    current = identity.credentials()
    fetcher = _CertificateFetcher(identity, current.generation)
    return grpc.dynamic_ssl_server_credentials(
        _configuration(current),
        # the stubs omit the None that grpc documents as "keep the current configuration"
        cast("Callable[[], grpc.ServerCertificateConfiguration]", fetcher),
        require_client_authentication=require_client_auth,
    )


def _peer_certificates(context: AnyServicerContext) -> list[bytes]:
    # grpc returns lists of bytes per key; the sync stubs say bytes, so accept both
    raw: object = context.auth_context().get(_PEER_CERT_KEY)
    if isinstance(raw, bytes):
        return [raw]
    if isinstance(raw, Iterable):
        return [item for item in raw if isinstance(item, bytes)]
    return []


def peer_spiffe_id(context: AnyServicerContext) -> str:
    """The SPIFFE ID of the verified client certificate of this call, or "".

    "" when the client sent no certificate, when the certificate cannot be parsed,
    and when it has no or several SPIFFE IDs (no valid SVID). Works with sync and
    ``grpc.aio`` servicer contexts.
    """
    pems = _peer_certificates(context)
    if len(pems) != 1:
        return ""
    return svid_id(pems[0])
