"""The verified caller of an inbound request, from the ASGI TLS extension, and the
token a request being served may forward to the services it calls."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from meshlib.tls.identity import svid_id

INBOUND_AUTHORIZATION: ContextVar[str | None] = ContextVar(
    "meshlib_inbound_authorization", default=None
)
"""``Bearer <token>`` of the request being served, set when its JWT provider has
``forward: true``; mesh clients add it to calls to services with ``forward_jwt``."""

_PEERS: OrderedDict[str, str] = OrderedDict()
_MAX_PEERS = 1024


def peer_from_scope(scope: Mapping[str, Any]) -> str:
    """The SPIFFE ID of the client certificate that the server verified, or ""."""
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return ""
    chain = tls.get("client_cert_chain") or ()
    if not chain or tls.get("client_cert_error"):
        return ""
    pem: str = chain[0]
    # parsing a certificate costs ~tens of µs: callers reconnect far less often
    peer = _PEERS.get(pem)
    if peer is None:
        peer = svid_id(pem.encode("ascii"))
        _PEERS[pem] = peer
        if len(_PEERS) > _MAX_PEERS:
            _PEERS.popitem(last=False)
    return peer


def cookies_of(header: str | None) -> dict[str, str]:
    """``Cookie: a=1; b=2`` → {"a": "1", "b": "2"} (malformed pairs are skipped)."""
    if not header:
        return {}
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out[name] = value.strip().strip('"')
    return out
