"""Policy schema for workload identity and mesh TLS."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from meshlib.config.types import Duration, Strict
from meshlib.tls.identity import spiffe_matches

_ONE_HOUR: Any = "1h"  # validated like a policy value
_SEGMENT = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class IdentityCA(Strict):
    """Issue this process's certificates from a local CA (`meshlib ca init`)."""

    dir: str
    ttl: Duration = Field(default=_ONE_HOUR, gt=0)


class IdentityFiles(Strict):
    """Certificate, key and bundle files that another agent keeps fresh."""

    cert: str
    key: str
    bundle: str


class IdentityConfig(Strict):
    """Where this process's workload certificate comes from; exactly one source."""

    namespace: str = "default"
    ca: IdentityCA | None = None
    files: IdentityFiles | None = None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _SEGMENT.fullmatch(value):
            raise ValueError(f"namespace {value!r} must be a DNS label (a-z, 0-9, '-')")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> IdentityConfig:
        if (self.ca is None) == (self.files is None):
            raise ValueError("identity needs exactly one source: `ca` or `files`")
        return self


class ServiceTls(Strict):
    """How this mesh's clients connect to a service.

    ``mutual`` (the default when the mesh has an identity): TLS with the workload
    certificate, and the server must present ``identity``, an exact SPIFFE ID or a
    pattern (default ``spiffe://<trust_domain>/ns/default/sa/<service>``).
    ``disabled``: plaintext, for services outside the mesh or in permissive mode.
    """

    mode: Literal["mutual", "disabled"] = "mutual"
    identity: str | None = None

    @field_validator("identity")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.startswith("spiffe://"):
                raise ValueError(
                    f"identity {value!r} must be a SPIFFE ID: spiffe://<domain>/<path>"
                )
            spiffe_matches(value, "spiffe://check.invalid/x")  # raises on a malformed pattern
        return value


InboundMtls = Literal["strict", "permissive", "disabled"]
