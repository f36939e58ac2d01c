"""Inbound security blocks → InboundSecurity (JWT authenticators keep their JWKS
caches across reloads that leave the providers unchanged)."""

from __future__ import annotations

import json
from pathlib import Path

from meshlib.config.authz_model import compile_policies
from meshlib.config.jwt_model import provider_spec
from meshlib.config.model import ServiceConfig
from meshlib.resilience.state import StateTable
from meshlib.security.inbound import InboundSecurity


def inbound_security(
    name: str, service: ServiceConfig, state: StateTable, base_dir: Path
) -> InboundSecurity:
    inbound = service.inbound
    if inbound is None:
        return InboundSecurity(name)
    authenticator = None
    providers = inbound.jwt
    if providers:
        from meshlib.security.jwt_auth import JwtAuthenticator  # PyJWT only when used

        dumped = json.dumps([p.model_dump(mode="json") for p in providers], sort_keys=True)
        authenticator = state.get(
            ("jwt", name, dumped, str(base_dir)),
            lambda: JwtAuthenticator([provider_spec(p, base_dir) for p in providers]),
        )
    policies = compile_policies(inbound.authz) if inbound.authz else ()
    return InboundSecurity(name, inbound.mtls, authenticator, policies)
