"""Inbound JWT authentication: token checks, JWKS caching and the policy schema.

Claims are checked against a fixed wall clock and JWKS caching runs on a fake
monotonic clock with a fake fetch, so nothing depends on timing; one test fetches
a JWKS from a real HTTPS server on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import TypeAdapter, ValidationError

from meshlib.config.jwt_model import JwtProviderConfig, JwtProviders, provider_spec
from meshlib.security.jwt_auth import (
    AuthError,
    JwksCache,
    JwtAuthenticator,
    JwtProviderSpec,
    Principal,
    parse_unverified,
)

ISSUER = "https://idp.example.com"
NOW = 1_700_000_000
URL = "https://idp.example.com/jwks"
DROP = object()

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = b"s" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return {**jwk, **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid}


JWKS = {"keys": [rsa_jwk(RSA_KEY, "rsa-1"), ec_jwk(EC_KEY, "ec-1")]}
JWKS_ROTATED = {"keys": [*JWKS["keys"], rsa_jwk(RSA_KEY_2, "rsa-2")]}


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": "orders",
        "iat": NOW - 10,
        "exp": NOW + 600,
        "scope": "read",
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not DROP}


def sign(
    payload: dict[str, Any] | None = None,
    *,
    key: Any = RSA_KEY,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    **headers: Any,
) -> str:
    extra = {"kid": kid, **headers} if kid is not None else headers
    return jwt.encode(payload or claims(), key, algorithm=alg, headers=extra)


def handmade(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature))
    )


def spec(**changes: Any) -> JwtProviderSpec:
    fields: dict[str, Any] = {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": ("orders",),
        "jwks_inline": JWKS,
    }
    fields.update(changes)
    return JwtProviderSpec(**fields)


def url_spec(**changes: Any) -> JwtProviderSpec:
    return spec(jwks_inline=None, jwks_url=URL, **changes)


def signed_raw(payload: dict[str, Any]) -> str:
    """RS256 over any JSON at all (PyJWT refuses to encode some invalid claims)."""
    header = b64(json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(payload).encode())
    signature = RSA_KEY.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{b64(signature)}"


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeFetch:
    """Serves documents (or raises errors) in order, repeating the last; counts calls."""

    def __init__(self, *responses: object, delay: float = 0.0) -> None:
        self.responses = list(responses)
        self.calls = 0
        self.delay = delay

    async def __call__(self, url: str) -> bytes:
        assert url == URL
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        response = self.responses[min(self.calls, len(self.responses)) - 1]
        if isinstance(response, Exception):
            raise response
        return json.dumps(response).encode()


def authenticator(*specs: JwtProviderSpec, **options: Any) -> JwtAuthenticator:
    options.setdefault("wall_clock", lambda: float(NOW))
    options.setdefault("clock", FakeClock())
    return JwtAuthenticator(specs or (spec(),), **options)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def check(
    authn: JwtAuthenticator, headers: dict[str, str], cookies: dict[str, str] | None = None
) -> Principal | None:
    return asyncio.run(authn.authenticate(headers, cookies or {}))


def rejection(token: str, authn: JwtAuthenticator | None = None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        check(authn or authenticator(), bearer(token))
    error = caught.value
    # the token never leaks into what the client or the logs see
    assert token not in str(error)
    assert token not in error.www_authenticate
    assert error.status == 401
    return error


def reason(token: str, authn: JwtAuthenticator | None = None) -> str:
    return rejection(token, authn).reason


# --- valid tokens ---------------------------------------------------------------------------------


def test_valid_token_gives_the_principal() -> None:
    principal = check(authenticator(), bearer(sign()))
    assert principal is not None
    assert principal.principal == f"{ISSUER}/alice"
    assert (principal.issuer, principal.subject, principal.provider) == (ISSUER, "alice", "idp")
    assert principal.claims["scope"] == "read"
    assert principal.token is None  # not forwarded unless the provider says so
    assert hash(principal) == hash(check(authenticator(), bearer(sign())))


def test_ec_key_and_forwarded_token() -> None:
    token = sign(key=EC_KEY, alg="ES256", kid="ec-1")
    principal = check(authenticator(spec(forward=True)), bearer(token))
    assert principal is not None and principal.token == token


def test_no_token_is_anonymous() -> None:
    authn = authenticator()
    assert check(authn, {}) is None
    assert check(authn, {"authorization": "Basic dXNlcjpwdw=="}) is None
    assert check(authn, {"authorization": "Bearer   "}) is None


def test_audience_list_and_unchecked_audience() -> None:
    assert check(authenticator(), bearer(sign(claims(aud=["billing", "orders"])))) is not None
    anyone = authenticator(spec(audiences=()))
    assert check(anyone, bearer(sign(claims(aud="elsewhere")))) is not None
    assert check(anyone, bearer(sign(claims(aud=DROP)))) is not None


def test_leeway_and_typ() -> None:
    assert check(authenticator(), bearer(sign(claims(exp=NOW - 20)))) is not None
    assert check(authenticator(), bearer(sign(claims(nbf=NOW + 20)))) is not None
    assert check(authenticator(), bearer(sign(typ="at+JWT"))) is not None


def test_token_from_cookie_and_custom_header() -> None:
    token = sign()
    cookie = authenticator(spec(from_headers=(), from_cookies=("session",)))
    assert check(cookie, {}, {"session": token}) is not None
    assert check(cookie, bearer(token)) is None  # not where this provider looks

    custom = authenticator(spec(from_headers=(("X-Auth-Token", "Token "),)))
    principal = check(custom, {"x-auth-token": f"token {token}"})
    assert principal is not None and principal.subject == "alice"
    assert check(custom, {"x-auth-token": token}) is None  # no prefix, not ours


def test_hmac_provider_with_inline_secret() -> None:
    secret_jwks = {"keys": [{"kty": "oct", "kid": "h1", "k": b64(SECRET)}]}
    hs = authenticator(spec(algorithms=("HS256",), jwks_inline=secret_jwks))
    assert check(hs, bearer(sign(key=SECRET, alg="HS256", kid="h1"))) is not None
    assert reason(sign(kid="h1"), hs) == "alg_not_allowed"


# --- rejected tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (claims(exp=NOW - 31), "expired"),
        (claims(nbf=NOW + 31), "not_yet_valid"),
        (claims(iat=NOW + 31), "not_yet_valid"),
        (claims(aud="billing"), "wrong_audience"),
        (claims(aud=["billing", "shipping"]), "wrong_audience"),
        (claims(aud=DROP), "wrong_audience"),
        (claims(iss="https://evil.example.com"), "wrong_issuer"),
        (claims(iss=DROP), "wrong_issuer"),
        (claims(exp=DROP), "missing_claim"),
        (claims(sub=DROP), "missing_claim"),
        (claims(sub=7), "malformed"),
        (claims(exp="tomorrow"), "malformed"),
        (claims(exp=True), "malformed"),
        (claims(aud=[1]), "malformed"),
    ],
)
def test_bad_claims(payload: dict[str, Any], expected: str) -> None:
    assert reason(sign(payload)) == expected


def test_challenge_names_provider_and_reason() -> None:
    error = rejection(sign(claims(exp=NOW - 3600)))
    assert error.realm == "idp"
    assert error.www_authenticate == (
        'Bearer realm="idp", error="invalid_token", error_description="expired"'
    )
    quoted = AuthError("bad_signature", realm='corp "idp"')
    assert quoted.www_authenticate.startswith('Bearer realm="corp \\"idp\\""')
    assert AuthError("missing", realm="idp").www_authenticate == 'Bearer realm="idp"'


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_unsigned_token_is_refused(alg: str) -> None:
    token = handmade({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims())
    assert reason(token) == "alg_not_allowed"


def test_tampered_payload_and_signature() -> None:
    header, _, signature = sign().split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    assert reason(f"{header}.{forged}.{signature}") == "bad_signature"
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    assert reason(f"{header}.{sign().split('.')[1]}.{flipped}") == "bad_signature"
    assert reason(f"{header}.{sign().split('.')[1]}.{signature[:40]}") == "bad_signature"
    other_key = sign(key=RSA_KEY_2)  # right kid, wrong key
    assert reason(other_key) == "bad_signature"


def test_hmac_signed_with_public_key_is_refused() -> None:
    # the classic confusion attack: HMAC keyed with the RSA public key the verifier holds
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert reason(f"{header}.{payload}.{b64(mac)}") == "alg_not_allowed"
    with pytest.raises(ValueError, match="cannot be mixed"):
        spec(algorithms=("RS256", "HS256"))


def test_key_type_must_match_alg() -> None:
    # an EC signature under the RSA key's kid, and the other way round
    assert reason(sign(key=EC_KEY, alg="ES256", kid="rsa-1")) == "alg_not_allowed"
    assert reason(sign(alg="RS256", kid="ec-1")) == "alg_not_allowed"
    # a provider list is not enough: the JWK's own alg binds the key
    pinned = {"keys": [rsa_jwk(RSA_KEY, "rsa-1", alg="RS256")]}
    authn = authenticator(spec(algorithms=("RS256", "PS256"), jwks_inline=pinned))
    assert reason(sign(alg="PS256"), authn) == "alg_not_allowed"
    assert check(authn, bearer(sign())) is not None
    # allowed by the key but not by the provider
    assert reason(sign(alg="PS256")) == "alg_not_allowed"


def test_unknown_kid_with_inline_keys() -> None:
    assert reason(sign(kid="nope")) == "unknown_kid"
    assert reason(sign(kid=None)) == "unknown_kid"  # two keys: a kid is needed


def test_single_key_needs_no_kid() -> None:
    single = authenticator(spec(jwks_inline={"keys": [rsa_jwk(RSA_KEY, None)]}))
    assert check(single, bearer(sign(kid=None))) is not None
    assert check(single, bearer(sign(kid="whatever"))) is not None
    kid_only = authenticator(spec(jwks_inline={"keys": [rsa_jwk(RSA_KEY, "rsa-1")]}))
    assert check(kid_only, bearer(sign(kid=None))) is not None
    assert reason(sign(kid="other"), kid_only) == "unknown_kid"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c.d",
        "..",
        "!!!.???.***",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0=.abc",  # padding is not base64url
        b64(b"not json") + "." + b64(b"{}") + ".",
        b64(b"[1, 2]") + "." + b64(b"{}") + ".",
        b64(b'{"alg": "RS256"}') + "." + b64(b"[]") + ".",
        b64(b'{"alg": "RS256"}') + "." + b64(b"\xff\xfe") + ".",
        b64(b'{"alg": "RS256", "alg": "none"}') + "." + b64(b"{}") + ".",
        b64(b'{"alg": "RS256"}') + "." + b64(b'{"exp": NaN}') + ".",
        b64(b'{"typ": "JWT"}') + "." + b64(b"{}") + ".",
        "bad\u00e9.token.here",
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert reason(token) == "malformed"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RS256", "kid": "rsa-1", "typ": "JOSE"},
        {"alg": "RS256", "kid": 5},
        {"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1},
        {"alg": "RS256", "kid": "rsa-1", "b64": False, "crit": ["b64"]},
        {"alg": ["RS256"], "kid": "rsa-1"},
    ],
)
def test_malformed_headers(header: dict[str, Any]) -> None:
    assert reason(handmade(header, claims(), b"x" * 256)) == "malformed"


def test_non_canonical_base64_is_malformed() -> None:
    header, payload, signature = sign().split(".")
    last = signature[-1]
    # 2048-bit signatures leave 4 unused bits in the last character
    twin = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = twin[twin.index(last) + 1]
    assert reason(f"{header}.{payload}.{signature[:-1]}{sibling}") == "malformed"


def test_oversized_token_is_refused_before_decoding() -> None:
    assert reason("a" * 9000) == "too_large"
    big = sign(claims(groups=["g" * 40] * 200))
    assert len(big) > 8192
    assert reason(big) == "too_large"
    assert check(authenticator(spec(max_token_bytes=65536)), bearer(big)) is not None
    with pytest.raises(AuthError) as caught:
        parse_unverified("x" * 100, 99)
    assert caught.value.reason == "too_large"


def test_parse_unverified_returns_header_and_claims() -> None:
    header, payload = parse_unverified(sign(), 8192)
    assert header == {"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}
    assert payload == claims()


# --- several providers ----------------------------------------------------------------------------


def test_first_matching_issuer_decides_the_error() -> None:
    old = spec(name="old", jwks_inline={"keys": [rsa_jwk(RSA_KEY_2, "rsa-old")]})
    other = spec(name="other", issuer="https://other.example.com")
    authn = authenticator(other, old, spec(name="new"))
    principal = check(authn, bearer(sign()))
    assert principal is not None and principal.provider == "new"

    error = rejection(sign(claims(exp=NOW - 3600), kid="rsa-old", key=RSA_KEY_2), authn)
    assert (error.reason, error.realm) == ("expired", "old")
    error = rejection(sign(kid="rsa-2", key=RSA_KEY_2), authn)
    assert (error.reason, error.realm) == ("unknown_kid", "old")
    error = rejection(sign(claims(iss="https://nobody.example.com")), authn)
    assert (error.reason, error.realm) == ("wrong_issuer", "other")


def test_any_valid_token_wins_over_an_invalid_one() -> None:
    authn = authenticator(spec(from_cookies=("session",)))
    principal = check(authn, bearer("garbage"), {"session": sign()})
    assert principal is not None and principal.subject == "alice"


def test_duplicate_provider_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        JwtAuthenticator([spec(), spec()])


# --- provider spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algorithms": ("none",)}, "never allowed"),
        ({"algorithms": ("RS256", "NONE")}, "never allowed"),
        ({"algorithms": ("RS257",)}, "unknown algorithm"),
        ({"algorithms": ("ES521",)}, "unknown algorithm"),
        ({"algorithms": ()}, "at least one"),
        ({"algorithms": ("HS256", "ES256")}, "cannot be mixed"),
        ({"algorithms": ("HS256",), "jwks_inline": None, "jwks_url": URL}, "inline 'oct'"),
        ({"jwks_file": "/etc/jwks.json"}, "exactly one"),
        ({"jwks_inline": None}, "exactly one"),
        ({"jwks_inline": None, "jwks_url": "http://idp.example.com/jwks"}, "https"),
        ({"jwks_inline": {"keys": [{"kty": "oct", "k": b64(SECRET)}]}}, "secret"),
        ({"jwks_inline": {"keys": [rsa_jwk(RSA_KEY, "a", d="xyz")]}}, "private"),
        ({"jwks_inline": {"keys": []}}, "no 'keys'"),
        ({"jwks_inline": {"keys": [rsa_jwk(RSA_KEY, None), ec_jwk(EC_KEY, "e")]}}, "kid"),
        ({"jwks_inline": {"keys": [rsa_jwk(RSA_KEY, "a", alg="ES256")]}}, "does not fit"),
        ({"jwks_inline": {"keys": [rsa_jwk(RSA_KEY, "a", use="enc")]}}, "use"),
        ({"from_headers": (("bad header", ""),)}, "header name"),
        ({"from_headers": ()}, "at least one header or cookie"),
        ({"name": "line\nbreak"}, "printable"),
        ({"leeway": -1.0}, "leeway"),
    ],
)
def test_bad_provider_specs(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_spec_normalises_header_names() -> None:
    assert spec(from_headers=[("X-Token", "")]).from_headers == (("x-token", ""),)


def test_weak_keys_are_refused() -> None:
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="too short"):
        spec(jwks_inline={"keys": [rsa_jwk(weak_rsa, "weak")]})
    short = {"keys": [{"kty": "oct", "kid": "h", "k": b64(b"short")}]}
    with pytest.raises(ValueError, match="too short"):
        spec(algorithms=("HS256",), jwks_inline=short)
    # long enough for HS256 but not HS512: refused per token, not at load
    hs = authenticator(
        spec(
            algorithms=("HS256", "HS512"),
            jwks_inline={"keys": [{"kty": "oct", "kid": "h", "k": b64(SECRET)}]},
        )
    )
    assert reason(handmade({"alg": "HS512", "kid": "h"}, claims(), b"x" * 64), hs) == (
        "alg_not_allowed"
    )


# --- JWKS cache -----------------------------------------------------------------------------------


def test_unknown_kids_refetch_at_most_once_per_min_refresh() -> None:
    clock = FakeClock()
    fetch = FakeFetch(JWKS, JWKS, JWKS_ROTATED)
    authn = authenticator(url_spec(), clock=clock, fetch=fetch)

    async def scenario() -> None:
        assert await authn.authenticate(bearer(sign()), {}) is not None
        assert fetch.calls == 1
        for round_ in range(2):
            for index in range(50):
                token = sign(kid=f"random-{round_}-{index}")
                with pytest.raises(AuthError) as caught:
                    await authn.authenticate(bearer(token), {})
                assert caught.value.reason == "unknown_kid"
            assert fetch.calls == 1 + round_  # the first round comes right after a load
            clock.advance(5.0)
        # a rotated key is picked up on its first appearance once a refresh is allowed
        principal = await authn.authenticate(bearer(sign(key=RSA_KEY_2, kid="rsa-2")), {})
        assert principal is not None
        assert fetch.calls == 3

    asyncio.run(scenario())


def test_keys_expire_after_the_cache_time() -> None:
    clock = FakeClock()
    fetch = FakeFetch(JWKS)
    authn = authenticator(url_spec(jwks_cache=60.0), clock=clock, fetch=fetch)
    for _ in range(3):
        assert check(authn, bearer(sign())) is not None
    assert fetch.calls == 1
    clock.advance(60.0)
    assert check(authn, bearer(sign())) is not None
    assert fetch.calls == 2


def test_failed_fetch_keeps_the_last_good_keys(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    fetch = FakeFetch(JWKS, OSError("connection refused"), b"not json", JWKS_ROTATED)
    authn = authenticator(url_spec(), clock=clock, fetch=fetch)
    assert check(authn, bearer(sign())) is not None
    clock.advance(301.0)
    with caplog.at_level(logging.WARNING, logger="meshlib.security"):
        assert check(authn, bearer(sign())) is not None
    assert fetch.calls == 2
    assert "connection refused" in caplog.text and "keeping 2 last good" in caplog.text
    # a failing issuer is not hammered: the next try waits for the refresh interval
    clock.advance(1.0)
    assert check(authn, bearer(sign())) is not None
    assert fetch.calls == 2
    clock.advance(5.0)
    assert check(authn, bearer(sign())) is not None  # bad JSON: still the old keys
    assert fetch.calls == 3
    clock.advance(5.0)
    assert check(authn, bearer(sign(key=RSA_KEY_2, kid="rsa-2"))) is not None
    assert fetch.calls == 4


def test_first_fetch_failing_means_unknown_kid_then_recovers() -> None:
    clock = FakeClock()
    fetch = FakeFetch(TimeoutError(), JWKS)
    authn = authenticator(url_spec(), clock=clock, fetch=fetch)
    assert reason(sign(), authn) == "unknown_kid"
    assert reason(sign(), authn) == "unknown_kid"
    assert fetch.calls == 1
    clock.advance(5.0)
    assert check(authn, bearer(sign())) is not None


def test_concurrent_first_requests_share_one_fetch() -> None:
    fetch = FakeFetch(JWKS, delay=0.01)
    authn = authenticator(url_spec(), fetch=fetch)

    async def scenario() -> list[Principal | None]:
        return await asyncio.gather(*(authn.authenticate(bearer(sign()), {}) for _ in range(20)))

    assert all(result is not None for result in asyncio.run(scenario()))
    assert fetch.calls == 1


def test_fetched_secrets_and_bad_keys_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    mixed = {
        "keys": [
            {"kty": "oct", "kid": "h", "k": b64(SECRET)},
            rsa_jwk(RSA_KEY, "priv", d="abc"),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            rsa_jwk(RSA_KEY, "rsa-1"),
        ]
    }
    authn = authenticator(url_spec(), fetch=FakeFetch(mixed))
    with caplog.at_level(logging.WARNING, logger="meshlib.security"):
        assert check(authn, bearer(sign())) is not None
        assert reason(sign(kid="broken"), authn) == "unknown_kid"
    assert caplog.text.count("skipping JWKS key") == 3
    assert b64(SECRET) not in caplog.text


def test_file_keys_reload_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(JWKS))
    clock = FakeClock()
    authn = authenticator(spec(jwks_inline=None, jwks_file=str(path)), clock=clock)
    assert check(authn, bearer(sign())) is not None

    path.write_text(json.dumps(JWKS_ROTATED))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    rotated = sign(key=RSA_KEY_2, kid="rsa-2")
    assert reason(rotated, authn) == "unknown_kid"  # within the refresh interval
    clock.advance(5.0)
    assert check(authn, bearer(rotated)) is not None

    path.write_text("{broken")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    clock.advance(5.0)
    assert check(authn, bearer(rotated)) is not None  # last good keys


def test_key_for_binds_the_algorithm() -> None:
    cache = JwksCache(spec(algorithms=("RS256", "PS256")), clock=FakeClock())

    async def keys() -> tuple[jwt.PyJWK, jwt.PyJWK]:
        return await cache.key_for("rsa-1", "RS256"), await cache.key_for("rsa-1", "PS256")

    rs, ps = asyncio.run(keys())
    assert (rs.algorithm_name, ps.algorithm_name) == ("RS256", "PS256")
    with pytest.raises(AuthError, match="alg_not_allowed"):
        asyncio.run(cache.key_for("rsa-1", "ES256"))


# --- JWKS over real HTTPS -------------------------------------------------------------------------


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class _JwksServer(ThreadingHTTPServer):
    hits = 0
    body = json.dumps(JWKS).encode()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the untrusted-client test fails handshakes on purpose


class _JwksHandler(BaseHTTPRequestHandler):
    server: _JwksServer

    def do_GET(self) -> None:
        self.server.hits += 1
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def https_jwks(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext, _JwksServer]]:
    cert_pem, key_pem = _self_signed()
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = _JwksServer(("127.0.0.1", 0), _JwksHandler)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cadata=cert_pem.decode())
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/jwks", client_context, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_jwks_over_https(
    https_jwks: tuple[str, ssl.SSLContext, _JwksServer], caplog: pytest.LogCaptureFixture
) -> None:
    url, context, server = https_jwks
    provider = spec(jwks_inline=None, jwks_url=url)
    trusted = authenticator(provider, ssl_context=context)
    assert check(trusted, bearer(sign())) is not None
    assert check(trusted, bearer(sign(key=EC_KEY, alg="ES256", kid="ec-1"))) is not None
    assert server.hits == 1

    # without the local CA the server is not trusted, so there are no keys
    untrusted = authenticator(provider)
    with caplog.at_level(logging.WARNING, logger="meshlib.security"):
        assert reason(sign(), untrusted) == "unknown_kid"
    assert "loading JWKS" in caplog.text
    assert server.hits == 1


# --- properties -----------------------------------------------------------------------------------

_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from([ISSUER, "alice", "orders", NOW]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["RS256", "ES256", "PS256", "HS256", "none", "EdDSA"]) | _json},
    optional={
        "kid": st.sampled_from(["rsa-1", "ec-1", "zzz"]) | _json,
        "typ": st.sampled_from(["JWT", "at+jwt", "JOSE"]) | _json,
        "crit": _json,
    },
)
_times = st.integers(NOW - 1000, NOW + 1000) | _json
# each claim is plausible half the time, so tokens get past the first check often
_claims = st.fixed_dictionaries(
    {
        "iss": st.just(ISSUER) | _json,
        "sub": st.just("alice") | _json,
        "exp": st.integers(NOW, NOW + 1000) | _json,
    },
    optional={
        "aud": st.sampled_from(["orders", ["orders", "x"]]) | _json,
        "nbf": _times,
        "iat": _times,
    },
)
_segments = st.text(alphabet=_B64_CHARS + ".=", max_size=60)
_tokens = st.one_of(
    st.text(max_size=80),
    _segments,
    st.builds(
        lambda header, payload, signature: ".".join(
            (b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), signature)
        ),
        _headers,
        _claims,
        st.sampled_from(["", "abc", sign().split(".")[2]]) | st.text(alphabet=_B64_CHARS),
    ),
    # properly signed, so the claim checks run on arbitrary claims
    st.builds(signed_raw, _claims),
)


@settings(max_examples=300, deadline=None)
@given(_tokens | st.binary(max_size=60).map(lambda data: data.decode("latin-1")))
def test_parse_unverified_only_raises_auth_error(token: str) -> None:
    try:
        header, payload = parse_unverified(token, 8192)
    except AuthError as error:
        assert error.reason in ("malformed", "too_large")
    else:
        assert isinstance(header, dict) and isinstance(payload, dict)
        assert isinstance(header["alg"], str)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_FUZZ_AUTHN = authenticator(
    spec(audiences=()),
    spec(
        name="hs", algorithms=("HS256",), jwks_inline={"keys": [{"kty": "oct", "k": b64(SECRET)}]}
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), _tokens.map(lambda token: f"Bearer {token}")))
def test_authenticate_only_raises_auth_error(value: str) -> None:
    errors = _Errors()
    logger = logging.getLogger("meshlib.security")
    logger.addHandler(errors)
    try:
        result = check(_FUZZ_AUTHN, {"authorization": value})
    except AuthError as error:
        assert error.status == 401 and error.realm in ("idp", "hs")
    else:
        assert result is None or result.principal == f"{ISSUER}/{result.subject}"
    finally:
        logger.removeHandler(errors)
    assert not errors.records  # the fail-closed safety net never had to catch a bug


# --- policy schema --------------------------------------------------------------------------------

PROVIDER = """\
name: corp-idp
issuer: https://idp.example.com
audiences: [orders, billing]
algorithms: [RS256]
jwks: {file: keys/jwks.json}
leeway: 10s
from_headers: [{name: X-Token, prefix: "Token "}]
from_cookies: [session]
forward: true
cache: 2m
"""


def provider(text: str = PROVIDER, **changes: Any) -> JwtProviderConfig:
    data = yaml.safe_load(text)
    data.update(changes)
    return JwtProviderConfig.model_validate({k: v for k, v in data.items() if v is not DROP})


def test_provider_config_to_spec(tmp_path: Path) -> None:
    built = provider_spec(provider(), tmp_path)
    assert built == JwtProviderSpec(
        name="corp-idp",
        issuer=ISSUER,
        audiences=("orders", "billing"),
        algorithms=("RS256",),
        jwks_file=str(tmp_path / "keys" / "jwks.json"),
        leeway=10.0,
        from_headers=(("x-token", "Token "),),
        from_cookies=("session",),
        forward=True,
        jwks_cache=120.0,
    )
    absolute = provider(jwks={"file": "/etc/mesh/jwks.json"})
    assert provider_spec(absolute, tmp_path).jwks_file == "/etc/mesh/jwks.json"


def test_provider_config_defaults() -> None:
    config = JwtProviderConfig.model_validate(
        {"name": "idp", "issuer": ISSUER, "jwks": {"url": URL}}
    )
    built = provider_spec(config, None)
    assert built.algorithms == ("RS256", "ES256")
    assert built.from_headers == (("authorization", "Bearer "),)
    assert (built.leeway, built.jwks_cache, built.audiences) == (30.0, 300.0, ())
    assert (built.jwks_url, built.forward, built.from_cookies) == (URL, False, ())
    inline = provider(jwks={"inline": JWKS}, algorithms=["RS256", "ES256"])
    authn = authenticator(provider_spec(inline, None))
    assert check(authn, {"x-token": f"Token {sign(claims(aud='billing'))}"}) is not None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algorithms": ["none"]}, "'none' is never allowed"),
        ({"algorithms": ["RS257"]}, "unknown algorithm 'RS257'"),
        ({"algorithms": ["RS256", "HS256"]}, "cannot be mixed"),
        ({"algorithms": ["HS256"]}, "need jwks.inline 'oct' keys"),
        ({"jwks": {"url": "http://idp.example.com/jwks"}}, "must be an https:// URL"),
        ({"jwks": {"url": "https://user:pw@idp.example.com/jwks"}}, "no credentials"),
        ({"jwks": {"url": URL, "file": "jwks.json"}}, "exactly one of inline, file, url"),
        ({"jwks": {}}, "exactly one of inline, file, url"),
        ({"jwks": {"path": "jwks.json"}}, "Extra inputs are not permitted"),
        ({"jwks": {"inline": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}}, "jwks.inline"),
        ({"jwks": DROP}, "Field required"),
        ({"issuer": ""}, "at least 1 character"),
        ({"audience": ["orders"]}, "Extra inputs are not permitted"),
        ({"leeway": "30"}, "bad duration"),
        ({"cache": "0s"}, "greater than 0"),
        ({"from_headers": [{"name": "x token"}]}, "not a valid header or cookie name"),
        ({"from_headers": [{"name": "x-token", "prefix": "T ", "extra": 1}]}, "Extra inputs"),
        ({"from_headers": [], "from_cookies": []}, "at least one of from_headers"),
        ({"from_cookies": ["a;b"]}, "not a valid header or cookie name"),
        ({"name": "tab\there"}, "printable ASCII"),
    ],
)
def test_bad_provider_config(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        provider(**changes)


def test_provider_names_are_unique() -> None:
    adapter = TypeAdapter(JwtProviders)
    one = yaml.safe_load(PROVIDER)
    with pytest.raises(ValidationError, match="duplicate JWT provider name 'corp-idp'"):
        adapter.validate_python([one, one])
    assert len(adapter.validate_python([one, {**one, "name": "other"}])) == 2
