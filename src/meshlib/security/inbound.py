"""A service's compiled inbound security: mTLS mode, JWT providers, RBAC policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshlib.security.rbac import Policy

if TYPE_CHECKING:
    from meshlib.security.jwt_auth import JwtAuthenticator


@dataclass(frozen=True, slots=True)
class InboundSecurity:
    """What ``mesh.asgi`` checks before the app sees a request.

    ``mtls``: ``strict`` refuses requests without a verified client certificate
    (403, also when the app runs behind a server that is not ``mesh.serve``),
    ``permissive`` accepts them with an empty peer identity, ``disabled`` ignores
    certificates. ``authenticator`` verifies JWTs (None: no providers), and
    ``policies`` decide who may call what.
    """

    service: str
    mtls: str | None = None  # not set: permissive under mesh.serve with an identity
    authenticator: JwtAuthenticator | None = None
    policies: tuple[Policy, ...] = ()

    @property
    def active(self) -> bool:
        return self.mtls == "strict" or self.authenticator is not None or bool(self.policies)
