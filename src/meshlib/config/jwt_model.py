"""Policy schema for inbound JWT providers, shaped like Istio's RequestAuthentication,
and their conversion to :class:`meshlib.security.jwt_auth.JwtProviderSpec`.

One provider::

    name: corp-idp
    issuer: https://idp.example.com
    audiences: [orders]               # empty: aud is not checked
    algorithms: [RS256, ES256]        # HS256/384/512 only alone and with inline keys
    jwks:                             # exactly one of inline, file, url
      url: https://idp.example.com/.well-known/jwks.json
    leeway: 30s
    from_headers: [{name: authorization, prefix: "Bearer "}]
    from_cookies: [session]
    forward: false                    # keep the token in the request for the app
    cache: 5m                         # how long fetched keys are trusted
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from meshlib.config.types import Duration, Strict

if TYPE_CHECKING:
    # imported on use: PyJWT and cryptography cost ~8 MiB that most processes don't need
    from meshlib.security.jwt_auth import JwtProviderSpec

_D30S: Any = "30s"  # validated like a policy value
_D5M: Any = "5m"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header and cookie names


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _token(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid header or cookie name")
    return value


NonEmpty = Annotated[str, Field(min_length=1)]
HeaderName = Annotated[str, BeforeValidator(_lower), AfterValidator(_token)]
CookieName = Annotated[str, AfterValidator(_token)]


class JwksConfig(Strict):
    """Where the provider's keys come from: exactly one of ``inline``, ``file``, ``url``."""

    inline: dict[str, Any] | None = None  # a JWKS document: {"keys": [...]}
    file: NonEmpty | None = None  # relative paths resolve against the policy file
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is None:
            return value
        url = urlsplit(value)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"jwks url {value!r} must be an https:// URL")
        if url.username is not None or url.password is not None:
            raise ValueError("put no credentials in the jwks url: it appears in logs")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> JwksConfig:
        given = [name for name in ("inline", "file", "url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"jwks needs exactly one of inline, file, url (got {', '.join(given) or 'none'})"
            )
        return self


class HeaderLocationConfig(Strict):
    """A header that carries the token after ``prefix`` (matched case-insensitively)."""

    name: HeaderName
    prefix: str = ""


def _default_headers() -> list[HeaderLocationConfig]:
    return [HeaderLocationConfig(name="authorization", prefix="Bearer ")]


class JwtProviderConfig(Strict):
    """One trusted token issuer (``iss``), its keys and where its tokens travel."""

    name: NonEmpty
    issuer: NonEmpty
    audiences: list[NonEmpty] = Field(default_factory=list)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    jwks: JwksConfig
    leeway: Duration = Field(default=_D30S, ge=0)
    from_headers: list[HeaderLocationConfig] = Field(default_factory=_default_headers)
    from_cookies: list[CookieName] = Field(default_factory=list)
    forward: bool = False
    cache: Duration = Field(default=_D5M, gt=0)

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        # the name is the WWW-Authenticate realm and appears in log lines
        if not (value.isascii() and value.isprintable()):
            raise ValueError("provider names must be printable ASCII")
        return value

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        from meshlib.security.jwt_auth import check_algorithms

        return list(check_algorithms(value))

    @model_validator(mode="after")
    def _consistent(self) -> JwtProviderConfig:
        from meshlib.security.jwt_auth import HMAC_ALGORITHMS, check_jwks

        symmetric = bool(self.algorithms) and self.algorithms[0] in HMAC_ALGORITHMS
        if symmetric and self.jwks.inline is None:
            raise ValueError(
                "HMAC algorithms need jwks.inline 'oct' keys: shared secrets are never "
                "read from a jwks file or url"
            )
        if self.jwks.inline is not None:
            try:
                check_jwks(self.jwks.inline, symmetric=symmetric)
            except ValueError as error:
                raise ValueError(f"jwks.inline: {error}") from None
        if not self.from_headers and not self.from_cookies:
            raise ValueError("give at least one of from_headers, from_cookies")
        return self


def _unique_names(providers: list[JwtProviderConfig]) -> list[JwtProviderConfig]:
    seen: dict[str, int] = {}
    for index, provider in enumerate(providers):
        first = seen.setdefault(provider.name, index)
        if first != index:
            raise ValueError(
                f"duplicate JWT provider name {provider.name!r} (entries {first} and {index})"
            )
    return providers


JwtProviders = Annotated[list[JwtProviderConfig], AfterValidator(_unique_names)]
"""A list of providers with unique names, tried in order."""


def provider_spec(config: JwtProviderConfig, base_dir: Path | None) -> JwtProviderSpec:
    """The runtime spec; a relative ``jwks.file`` resolves against ``base_dir``."""
    from meshlib.security.jwt_auth import JwtProviderSpec

    jwks_file: str | None = None
    if config.jwks.file is not None:
        path = Path(config.jwks.file)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        jwks_file = str(path)
    return JwtProviderSpec(
        name=config.name,
        issuer=config.issuer,
        audiences=tuple(config.audiences),
        algorithms=tuple(config.algorithms),
        jwks_inline=config.jwks.inline,
        jwks_file=jwks_file,
        jwks_url=config.jwks.url,
        leeway=config.leeway,
        from_headers=tuple((header.name, header.prefix) for header in config.from_headers),
        from_cookies=tuple(config.from_cookies),
        forward=config.forward,
        jwks_cache=config.cache,
    )
