"""Inbound JWT authentication: find a bearer token, check it against a provider.

Everything here is pure apart from loading a provider's JWKS (over HTTPS or from
a file), which is cached and rate limited, so the ASGI middleware can call
:meth:`JwtAuthenticator.authenticate` on every request. Every way a token can be
wrong ends in :class:`AuthError` (status 401), never in another exception.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import httpx
import jwt

__all__ = [
    "HMAC_ALGORITHMS",
    "KNOWN_ALGORITHMS",
    "AuthError",
    "Fetch",
    "JwksCache",
    "JwtAuthenticator",
    "JwtProviderSpec",
    "Principal",
    "Reason",
    "check_algorithms",
    "check_jwks",
    "parse_unverified",
]

log = logging.getLogger("meshlib.security")

Reason = Literal[
    "missing",
    "malformed",
    "too_large",
    "alg_not_allowed",
    "unknown_kid",
    "bad_signature",
    "wrong_issuer",
    "wrong_audience",
    "expired",
    "not_yet_valid",
    "missing_claim",
]
Fetch = Callable[[str], Awaitable[bytes]]
"""Fetch a URL and return the body; raise on any failure (non-200 included)."""

# alg -> (kty, allowed curves or None): a key is only ever used with algorithms
# of its own type, which is what makes algorithm confusion impossible
_ALG_KEYS: dict[str, tuple[str, frozenset[str] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "ES256K": ("EC", frozenset({"secp256k1"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
    "HS256": ("oct", None),
    "HS384": ("oct", None),
    "HS512": ("oct", None),
}
KNOWN_ALGORITHMS: frozenset[str] = frozenset(_ALG_KEYS)
HMAC_ALGORITHMS: frozenset[str] = frozenset({"HS256", "HS384", "HS512"})
_EC_DEFAULT_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})
_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_MAX_JWKS_BYTES = 1 << 20
# PyJWS re-checks that the token's alg equals the PyJWK's bound algorithm
_JWS = jwt.PyJWS(options={"enforce_minimum_key_length": True})


class AuthError(Exception):
    """A request's token was rejected; always a 401 with an RFC 6750 challenge.

    ``detail`` is for logs only; neither it nor the token reaches the client.
    ``missing`` is for callers that require a token (authorization rules): the
    authenticator itself treats a request without any token as anonymous.
    """

    status: ClassVar[int] = 401

    def __init__(self, reason: Reason, detail: str = "", *, realm: str = "") -> None:
        super().__init__(reason, detail)
        self.reason: Reason = reason
        self.detail = detail
        self.realm = realm

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason

    def with_realm(self, realm: str) -> AuthError:
        """The same error, challenged in ``realm`` (the provider's name)."""
        return AuthError(self.reason, self.detail, realm=realm)

    @property
    def www_authenticate(self) -> str:
        """The ``WWW-Authenticate`` header value for the 401 response."""
        realm = self.realm.replace("\\", "\\\\").replace('"', '\\"')
        if self.reason == "missing":
            # RFC 6750 3.1: no error code when the request had no credentials at all
            return f'Bearer realm="{realm}"'
        return f'Bearer realm="{realm}", error="invalid_token", error_description="{self.reason}"'


def check_algorithms(algorithms: Iterable[str]) -> tuple[str, ...]:
    """Return the algorithms without duplicates; raise ValueError for an unsafe list."""
    given = tuple(algorithms)
    for alg in given:
        if not isinstance(alg, str):
            raise ValueError(f"algorithm names are strings (got {alg!r})")
    algs = tuple(dict.fromkeys(given))
    if not algs:
        raise ValueError("list at least one algorithm")
    for alg in algs:
        if alg.lower() == "none":
            raise ValueError("algorithm 'none' is never allowed: it accepts unsigned tokens")
        if alg not in _ALG_KEYS:
            raise ValueError(
                f"unknown algorithm {alg!r}: use one of {', '.join(sorted(KNOWN_ALGORITHMS))}"
            )
    hmac = [alg for alg in algs if alg in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(algs):
        raise ValueError(
            f"HMAC ({', '.join(hmac)}) cannot be mixed with asymmetric algorithms in one "
            "provider: a public key must never double as a shared secret"
        )
    return algs


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _default_alg(jwk: Mapping[str, Any]) -> str | None:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "oct":
        return "HS256"
    if kty == "EC" and isinstance(crv, str):
        return _EC_DEFAULT_ALG.get(crv)
    if kty == "OKP" and crv in ("Ed25519", "Ed448"):
        return "EdDSA"
    return None


def _fits(jwk: Mapping[str, Any], alg: str) -> bool:
    """Whether the key may verify ``alg``: same key type and curve, and its own alg if set."""
    kty, curves = _ALG_KEYS[alg]
    if jwk.get("kty") != kty:
        return False
    crv = jwk.get("crv")
    if curves is not None and not (isinstance(crv, str) and crv in curves):
        return False
    declared = jwk.get("alg")
    return declared is None or declared == alg


def _jwk_problem(jwk: object, *, symmetric: bool) -> str | None:
    """Why this JWKS member cannot verify tokens for the provider, or None if it can."""
    if not isinstance(jwk, Mapping):
        return "not a JSON object"
    kty = jwk.get("kty")
    if kty not in ("RSA", "EC", "OKP", "oct"):
        return f"unsupported kty {_short(kty)}"
    if symmetric and kty != "oct":
        return "an HMAC provider takes only kty 'oct' keys"
    if not symmetric and kty == "oct":
        return "a secret (kty 'oct') key cannot serve an asymmetric provider"
    if not symmetric and _PRIVATE_MEMBERS.intersection(jwk):
        return "carries private key members: publish public keys only"
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "kid is not a string"
    use = jwk.get("use")
    if use is not None and use != "sig":
        return f"use is {_short(use)}, not 'sig'"
    ops = jwk.get("key_ops")
    if ops is not None and not (isinstance(ops, list) and "verify" in ops):
        return "key_ops does not include 'verify'"
    alg = jwk.get("alg")
    if alg is not None:
        if not (isinstance(alg, str) and alg in _ALG_KEYS and _fits(jwk, alg)):
            return f"alg {_short(alg)} does not fit the key type"
    else:
        alg = _default_alg(jwk)
        if alg is None:
            return f"unsupported curve {_short(jwk.get('crv'))}"
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=alg)
    except Exception:
        # PyJWT's messages can quote the whole JWK, secrets included: say nothing more
        return "cannot be loaded as a key"
    if key.Algorithm.check_key_length(key.key):
        return f"too short for {alg}"
    return None


@dataclass(slots=True)
class _Key:
    jwk: dict[str, Any]
    built: dict[str, jwt.PyJWK] = field(default_factory=dict)

    def for_alg(self, alg: str) -> jwt.PyJWK:
        """The key bound to ``alg`` (a PyJWK verifies with one algorithm only)."""
        key = self.built.get(alg)
        if key is None:
            try:
                key = jwt.PyJWK(self.jwk, algorithm=alg)
            except Exception:
                raise AuthError("alg_not_allowed", "the key cannot be used with alg") from None
            if key.Algorithm.check_key_length(key.key):
                raise AuthError("alg_not_allowed", f"the key is too short for {alg}")
            self.built[alg] = key
        return key


_Index = dict[str | None, list[_Key]]


def _index_jwks(document: object, *, symmetric: bool, strict: bool, where: str) -> _Index:
    """Usable keys by kid; ``strict`` refuses bad members instead of skipping them."""
    if not isinstance(document, Mapping):
        raise ValueError("a JWKS is a JSON object with a 'keys' list")
    members = document.get("keys")
    if not isinstance(members, list) or not members:
        raise ValueError("the JWKS has no 'keys' (or the list is empty)")

    def refuse(position: int, problem: str) -> None:
        if strict:
            raise ValueError(f"JWKS key {position}: {problem}")
        log.warning("%s: skipping JWKS key %d: %s", where, position, problem)

    usable: list[tuple[int, dict[str, Any]]] = []
    for position, jwk in enumerate(members):
        problem = _jwk_problem(jwk, symmetric=symmetric)
        if problem is None:
            usable.append((position, dict(jwk)))
        else:
            refuse(position, problem)
    index: _Index = {}
    for position, jwk in usable:
        if jwk.get("kid") is None and len(usable) > 1:
            refuse(position, "without a kid it cannot be told apart from the other keys")
            continue
        index.setdefault(jwk.get("kid"), []).append(_Key(jwk))
    if not index:
        raise ValueError("the JWKS has no usable keys")
    return index


def check_jwks(document: object, *, symmetric: bool) -> None:
    """Raise ValueError unless every member of an inline JWKS is usable by the provider."""
    _index_jwks(document, symmetric=symmetric, strict=True, where="inline JWKS")


def _header_location(item: object) -> tuple[str, str]:
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise ValueError(f"from_headers takes (name, prefix) pairs (got {item!r})")
    name, prefix = item
    if not (isinstance(name, str) and isinstance(prefix, str)):
        raise ValueError(f"from_headers takes (name, prefix) string pairs (got {item!r})")
    name = name.lower()
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"bad header name {name!r}")
    return name, prefix


@dataclass(frozen=True, slots=True)
class JwtProviderSpec:
    """One trusted token issuer, its keys and where its tokens travel.

    Exactly one of ``jwks_inline``, ``jwks_file`` and ``jwks_url`` (https) is set.
    HMAC algorithms need inline ``oct`` keys and cannot share a provider with
    asymmetric ones. Durations are in seconds.
    """

    name: str
    issuer: str
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwks_inline: Mapping[str, Any] | None = field(default=None, hash=False)
    jwks_file: str | None = None
    jwks_url: str | None = None
    leeway: float = 30.0
    from_headers: tuple[tuple[str, str], ...] = (("authorization", "Bearer "),)
    from_cookies: tuple[str, ...] = ()
    forward: bool = False
    max_token_bytes: int = 8192
    jwks_cache: float = 300.0
    jwks_min_refresh: float = 5.0

    def __post_init__(self) -> None:
        # names end up in WWW-Authenticate and log lines: no header injection
        if not (self.name and self.name.isascii() and self.name.isprintable()):
            raise ValueError(f"provider name {self.name!r} must be non-empty printable ASCII")
        where = f"JWT provider {self.name!r}"
        if not self.issuer:
            raise ValueError(f"{where}: issuer must not be empty")
        try:
            algorithms = check_algorithms(self.algorithms)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        object.__setattr__(self, "algorithms", algorithms)
        object.__setattr__(self, "audiences", tuple(self.audiences))
        if any(not (isinstance(aud, str) and aud) for aud in self.audiences):
            raise ValueError(f"{where}: audiences must be non-empty strings")

        sources = [
            name
            for name, value in (
                ("jwks_inline", self.jwks_inline),
                ("jwks_file", self.jwks_file),
                ("jwks_url", self.jwks_url),
            )
            if value is not None
        ]
        if len(sources) != 1:
            raise ValueError(
                f"{where}: set exactly one of jwks_inline, jwks_file, jwks_url "
                f"(got {', '.join(sources) or 'none'})"
            )
        symmetric = algorithms[0] in HMAC_ALGORITHMS
        if symmetric and self.jwks_inline is None:
            raise ValueError(
                f"{where}: HMAC algorithms need inline 'oct' keys; shared secrets are "
                "never fetched from a file or URL"
            )
        if self.jwks_url is not None:
            url = urlsplit(self.jwks_url)
            if url.scheme != "https" or not url.hostname:
                raise ValueError(f"{where}: jwks_url must be an https:// URL")
        if self.jwks_inline is not None:
            try:
                check_jwks(self.jwks_inline, symmetric=symmetric)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None

        if not (math.isfinite(self.leeway) and self.leeway >= 0):
            raise ValueError(f"{where}: leeway must be >= 0 seconds")
        if self.max_token_bytes <= 0:
            raise ValueError(f"{where}: max_token_bytes must be positive")
        if not (math.isfinite(self.jwks_cache) and self.jwks_cache > 0):
            raise ValueError(f"{where}: jwks_cache must be > 0 seconds")
        if not (math.isfinite(self.jwks_min_refresh) and self.jwks_min_refresh >= 0):
            raise ValueError(f"{where}: jwks_min_refresh must be >= 0 seconds")
        try:
            headers = tuple(_header_location(item) for item in self.from_headers)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        object.__setattr__(self, "from_headers", headers)
        object.__setattr__(self, "from_cookies", tuple(self.from_cookies))
        if any(not (isinstance(name, str) and name) for name in self.from_cookies):
            raise ValueError(f"{where}: cookie names must be non-empty strings")
        if not headers and not self.from_cookies:
            raise ValueError(f"{where}: give at least one header or cookie to read tokens from")

    @property
    def symmetric(self) -> bool:
        """Whether the provider verifies with shared secrets (HS*)."""
        return self.algorithms[0] in HMAC_ALGORITHMS


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified token's caller; ``principal`` is Istio's requestPrincipal (``iss/sub``)."""

    issuer: str
    subject: str
    principal: str
    claims: Mapping[str, Any] = field(hash=False)
    provider: str
    token: str | None = None  # kept only when the provider forwards tokens


# --- parsing -----------------------------------------------------------------------------------


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 4: a duplicated member would let two parsers read different claims
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError("duplicate member")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(data: bytes) -> dict[str, Any]:
    value = json.loads(
        data.decode("utf-8"), object_pairs_hook=_strict_object, parse_constant=_no_constant
    )
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _b64url(segment: str) -> bytes:
    if len(segment) % 4 == 1 or not _B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    # one token, one spelling: refuse set padding bits
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("non-canonical base64url")
    return data


def parse_unverified(token: str, max_bytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, unverified; raises only AuthError.

    The size is checked before any decoding. The header must name an ``alg``,
    have a string ``kid`` if any, a JWT ``typ`` if any, and no ``crit``.
    """
    if not isinstance(token, str):
        raise AuthError("malformed", "the token is not a string")
    if len(token) > max_bytes:
        raise AuthError("too_large", f"over {max_bytes} bytes")
    if not token.isascii():  # so that from here on characters are bytes
        raise AuthError("malformed", "non-ASCII characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed", f"{len(parts)} parts, a JWS has 3")
    try:
        header = _json_object(_b64url(parts[0]))
    except (ValueError, RecursionError, binascii.Error):
        raise AuthError("malformed", "the header is not base64url JSON") from None
    try:
        claims = _json_object(_b64url(parts[1]))
        _b64url(parts[2])
    except (ValueError, RecursionError, binascii.Error):
        raise AuthError("malformed", "the payload or signature is not base64url JSON") from None
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise AuthError("malformed", "the header has no alg")
    typ = header.get("typ")
    if typ is not None and not (isinstance(typ, str) and typ.lower() in _TYPES):
        raise AuthError("malformed", "typ is not JWT")
    if "kid" in header and not isinstance(header["kid"], str):
        raise AuthError("malformed", "kid is not a string")
    if "crit" in header:
        raise AuthError("malformed", "critical header extensions are not supported")
    return header, claims


# --- keys --------------------------------------------------------------------------------------


async def _https_get(url: str, ssl_context: ssl.SSLContext | None, timeout: float) -> bytes:
    # trust_env off: the mesh decides trust and egress, not ambient proxy/CA variables
    async with (
        httpx.AsyncClient(
            verify=ssl_context if ssl_context is not None else True,
            timeout=timeout,
            trust_env=False,
        ) as client,
        client.stream("GET", url, headers={"accept": "application/json"}) as response,
    ):
        if response.status_code != 200:
            raise OSError(f"HTTP {response.status_code}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > _MAX_JWKS_BYTES:
                raise OSError(f"JWKS larger than {_MAX_JWKS_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


class JwksCache:
    """A provider's verification keys, by kid.

    URL keys are cached for ``jwks_cache`` seconds; file keys are re-read when the
    file changes; inline keys never change. Any load (including one for an unknown
    kid) happens at most once per ``jwks_min_refresh`` seconds, so random kids cannot
    cause a flood of fetches, and a failed load keeps serving the last good keys.
    """

    def __init__(
        self,
        spec: JwtProviderSpec,
        *,
        clock: Callable[[], float] = time.monotonic,
        fetch: Fetch | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._spec = spec
        self._clock = clock
        self._timeout = timeout
        self._fetch: Fetch = fetch or (lambda url: _https_get(url, ssl_context, timeout))
        self._where = f"JWT provider {spec.name!r}"
        self._keys: _Index = {}
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._file_version: tuple[int, int, int] | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        if spec.jwks_inline is not None:
            self._keys = _index_jwks(
                spec.jwks_inline, symmetric=spec.symmetric, strict=True, where=self._where
            )

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key for a token's ``kid`` bound to its ``alg``; AuthError if there is none."""
        if alg not in self._spec.algorithms:
            raise AuthError("alg_not_allowed", f"{alg} is not accepted by the provider")
        if self._spec.jwks_inline is None:
            if self._stale():
                # with keys in hand, a load already under way need not be waited for
                await self._refresh(wait=not self._keys)
            key = self._select(kid, alg)
            if key is None:
                await self._refresh(wait=True)
                key = self._select(kid, alg)
        else:
            key = self._select(kid, alg)
        if key is None:
            raise AuthError("unknown_kid", "no key with this kid")
        return key.for_alg(alg)

    def _stale(self) -> bool:
        if self._spec.jwks_file is not None or self._loaded_at is None:
            return True  # a file is checked (one stat) as often as refreshes are allowed
        return self._clock() - self._loaded_at >= self._spec.jwks_cache

    def _select(self, kid: str | None, alg: str) -> _Key | None:
        candidates = self._keys.get(kid)
        if candidates is None:
            everything = [key for keys in self._keys.values() for key in keys]
            # one key needs no kid, on either side
            single = len(everything) == 1
            if single and (kid is None or everything[0].jwk.get("kid") is None):
                candidates = everything
            else:
                return None
        for key in candidates:
            if _fits(key.jwk, alg):
                return key
        raise AuthError("alg_not_allowed", f"the key for this kid does not take {alg}")

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def _throttled(self) -> bool:
        last = self._last_attempt
        return last is not None and self._clock() - last < self._spec.jwks_min_refresh

    async def _refresh(self, *, wait: bool) -> None:
        lock = self._loop_lock()
        if lock.locked():
            if not wait:
                return
        elif self._throttled():
            return
        async with lock:
            # whoever held the lock may have just loaded: that load counts
            if self._throttled():
                return
            self._last_attempt = self._clock()
            if self._spec.jwks_file is not None:
                self._load_file(self._spec.jwks_file)
            elif self._spec.jwks_url is not None:
                await self._load_url(self._spec.jwks_url)

    def _install(self, document: object) -> None:
        self._keys = _index_jwks(document, symmetric=False, strict=False, where=self._where)
        self._loaded_at = self._clock()

    def _keep_last_good(self, source: str, error: object) -> None:
        count = sum(len(keys) for keys in self._keys.values())
        log.warning(
            "%s: loading JWKS from %s failed (%s); keeping %d last good key(s)",
            self._where,
            source,
            error,
            count,
        )

    def _load_file(self, path: str) -> None:
        # a stat per refresh window and a read only on change: cheap enough inline
        try:
            stat = os.stat(path)
            version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if version == self._file_version:
                self._loaded_at = self._clock()
                return
            with open(path, "rb") as handle:
                data = handle.read(_MAX_JWKS_BYTES + 1)
            if len(data) > _MAX_JWKS_BYTES:
                raise ValueError(f"JWKS larger than {_MAX_JWKS_BYTES} bytes")
            self._install(_json_object(data))
        except (OSError, ValueError, RecursionError) as error:
            self._keep_last_good(path, error)
            return
        self._file_version = version

    async def _load_url(self, url: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._fetch(url)
            if len(data) > _MAX_JWKS_BYTES:
                raise ValueError(f"JWKS larger than {_MAX_JWKS_BYTES} bytes")
            self._install(_json_object(data))
        except Exception as error:
            # the fetch is pluggable, so any failure means "no new keys", nothing more
            self._keep_last_good(url, str(error) or type(error).__name__)


# --- authentication ----------------------------------------------------------------------------


def _tokens(
    spec: JwtProviderSpec, headers: Mapping[str, str], cookies: Mapping[str, str]
) -> Iterator[str]:
    for name, prefix in spec.from_headers:
        value = headers.get(name)
        if value is None:
            continue
        if prefix:
            # auth schemes are case-insensitive (RFC 9110 11.1); other schemes are not ours
            if value[: len(prefix)].lower() != prefix.lower():
                continue
            value = value[len(prefix) :]
        value = value.strip()
        if value:
            yield value
    for name in spec.from_cookies:
        value = cookies.get(name, "").strip()
        if value:
            yield value


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("malformed", f"{name} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise AuthError("malformed", f"{name} is not finite")
    return value


def _text_claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if value is None or value == "":
        raise AuthError("missing_claim", f"no {name}")
    if not isinstance(value, str):
        raise AuthError("malformed", f"{name} is not a string")
    try:
        value.encode("utf-8")  # lone surrogates would break every later use
    except UnicodeEncodeError:
        raise AuthError("malformed", f"{name} is not valid text") from None
    return value


class JwtAuthenticator:
    """Checks a request's bearer tokens against the configured providers.

    ``clock`` (monotonic) drives JWKS caching; ``wall_clock`` (epoch seconds)
    is what ``exp``/``nbf``/``iat`` are compared with.
    """

    def __init__(
        self,
        providers: Sequence[JwtProviderSpec],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        fetch: Fetch | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._providers = tuple(providers)
        names = [spec.name for spec in self._providers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"JWT provider names must be unique: {', '.join(duplicates)}")
        self._wall_clock = wall_clock
        self._caches = {
            spec.name: JwksCache(spec, clock=clock, fetch=fetch, ssl_context=ssl_context)
            for spec in self._providers
        }

    @property
    def providers(self) -> tuple[JwtProviderSpec, ...]:
        """The providers, in the order they are tried."""
        return self._providers

    async def authenticate(
        self, headers: Mapping[str, str], cookies: Mapping[str, str]
    ) -> Principal | None:
        """The caller of a valid token, None without any token, AuthError otherwise.

        ``headers`` has lowercase names. A token is tried with each provider that
        reads it from where it was found and whose issuer matches its ``iss``; the
        first such provider's error is raised when none accepts it.
        """
        candidates: dict[str, dict[str, JwtProviderSpec]] = {}
        for spec in self._providers:
            for token in _tokens(spec, headers, cookies):
                candidates.setdefault(token, {})[spec.name] = spec
        if not candidates:
            return None
        first_error: AuthError | None = None
        for token, specs in candidates.items():
            try:
                return await self._token(token, list(specs.values()))
            except AuthError as error:
                first_error = first_error or error
            except Exception:
                # fail closed on a bug, loudly, rather than leak a 500 with details
                log.exception("JWT check failed unexpectedly; rejecting the token")
                realm = next(iter(specs))
                first_error = first_error or AuthError("malformed", realm=realm)
        assert first_error is not None
        raise first_error

    async def _token(self, token: str, specs: list[JwtProviderSpec]) -> Principal:
        limit = max(spec.max_token_bytes for spec in specs)
        try:
            header, claims = parse_unverified(token, limit)
        except AuthError as error:
            raise error.with_realm(specs[0].name) from None
        issuer = claims.get("iss")
        matching = [spec for spec in specs if spec.issuer == issuer]
        if not matching:
            raise AuthError("wrong_issuer", "no provider has this issuer", realm=specs[0].name)
        first_error: AuthError | None = None
        for spec in matching:
            try:
                return await self._verify(spec, token, header, claims)
            except AuthError as error:
                first_error = first_error or error.with_realm(spec.name)
        assert first_error is not None
        raise first_error

    async def _verify(
        self, spec: JwtProviderSpec, token: str, header: dict[str, Any], claims: dict[str, Any]
    ) -> Principal:
        if len(token) > spec.max_token_bytes:
            raise AuthError("too_large", f"over {spec.max_token_bytes} bytes")
        alg: str = header["alg"]
        if alg not in spec.algorithms:
            raise AuthError("alg_not_allowed", f"{_short(alg)} is not accepted")
        key = await self._caches[spec.name].key_for(header.get("kid"), alg)
        try:
            # the claims parsed above come from the same bytes this signature covers
            _JWS.decode_complete(token, key=key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "the signature does not verify") from None
        except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError):
            raise AuthError("alg_not_allowed", "the key does not take this alg") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("malformed", "the token cannot be verified") from None

        if claims.get("iss") != spec.issuer:
            raise AuthError("wrong_issuer", "iss does not match")
        if spec.audiences:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud
            if audiences is None:
                raise AuthError("wrong_audience", "no aud")
            if not (isinstance(audiences, list) and all(isinstance(a, str) for a in audiences)):
                raise AuthError("malformed", "aud is not a string or a list of strings")
            if not set(audiences).intersection(spec.audiences):
                raise AuthError("wrong_audience", "aud does not match")
        now = self._wall_clock()
        expires = _time_claim(claims, "exp")
        if expires is None:
            raise AuthError("missing_claim", "no exp")
        if expires <= now - spec.leeway:
            raise AuthError("expired", "exp has passed")
        for name in ("nbf", "iat"):
            moment = _time_claim(claims, name)
            if moment is not None and moment > now + spec.leeway:
                raise AuthError("not_yet_valid", f"{name} is in the future")
        subject = _text_claim(claims, "sub")
        return Principal(
            issuer=spec.issuer,
            subject=subject,
            principal=f"{spec.issuer}/{subject}",
            claims=MappingProxyType(claims),
            provider=spec.name,
            token=token if spec.forward else None,
        )
