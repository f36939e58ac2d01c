"""SPIFFE IDs: strict parsing, workload IDs, pattern matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlib.tls.identity import (
    SpiffeId,
    parse_spiffe_id,
    spiffe_matches,
    validate_trust_domain,
    workload_id,
)

USERS = "spiffe://example.org/ns/default/sa/users"


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        (USERS, "example.org", "/ns/default/sa/users"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://td-1_x.local/a", "td-1_x.local", "/a"),
        ("spiffe://example.org/A.b-C_d/..x/x..", "example.org", "/A.b-C_d/..x/x.."),
    ],
)
def test_valid_ids(text: str, trust_domain: str, path: str) -> None:
    parsed = parse_spiffe_id(text)
    assert (parsed.trust_domain, parsed.path) == (trust_domain, path)
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty string"),
        ("https://example.org/a", "scheme must be 'spiffe://'"),
        ("example.org/ns/default/sa/users", "scheme must be 'spiffe://'"),
        ("spiffe:/example.org/a", "scheme must be 'spiffe://'"),
        ("SPIFFE://example.org/a", "scheme must be lowercase"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///a", "trust domain is empty"),
        ("spiffe://Example.org/a", "trust domain must be lowercase"),
        ("spiffe://exa mple.org/a", "invalid character ' '"),
        ("spiffe://exämple.org/a", "invalid character 'ä'"),
        ("spiffe://example.org:8443/a", "port"),
        ("spiffe://user@example.org/a", "userinfo"),
        ("spiffe://user:pw@example.org/a", "userinfo"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org/a#frag", "fragment"),
        ("spiffe://example.org/", "must not end with '/'"),
        ("spiffe://example.org/a/", "must not end with '/'"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/a/./b", "'.' is not allowed"),
        ("spiffe://example.org/a/../b", "'..' is not allowed"),
        ("spiffe://example.org/a%20b", "invalid character '%'"),
        ("spiffe://example.org/a b", "invalid character ' '"),
        ("spiffe://example.org/" + "a" * 2100, "longer than 2048 bytes"),
        ("spiffe://" + "a" * 256 + "/x", "longer than 255 bytes"),
    ],
)
def test_invalid_ids_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid SPIFFE ID") as caught:
        parse_spiffe_id(text)
    assert reason in str(caught.value)


def test_length_limit_is_in_bytes() -> None:
    prefix = "spiffe://example.org/"
    assert len(str(parse_spiffe_id(prefix + "a" * (2048 - len(prefix))))) == 2048
    with pytest.raises(ValueError, match="2048 bytes"):
        parse_spiffe_id(prefix + "a" * (2049 - len(prefix)))


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        SpiffeId("EXAMPLE.org", "/a")
    with pytest.raises(ValueError, match="start with '/'"):
        SpiffeId("example.org", "a")


def test_namespace_and_service() -> None:
    parsed = parse_spiffe_id("spiffe://example.org/ns/prod/sa/users")
    assert (parsed.namespace, parsed.service) == ("prod", "users")
    for other in ("spiffe://example.org", "spiffe://example.org/ns/prod", "spiffe://e/x/a/sa/b"):
        assert parse_spiffe_id(other).namespace is None
        assert parse_spiffe_id(other).service is None


def test_workload_id() -> None:
    assert str(workload_id("example.org", "users")) == USERS
    assert str(workload_id("example.org", "orders", "shop")) == (
        "spiffe://example.org/ns/shop/sa/orders"
    )
    with pytest.raises(ValueError, match="invalid service"):
        workload_id("example.org", "a/b")
    with pytest.raises(ValueError, match="invalid namespace"):
        workload_id("example.org", "users", "..")
    with pytest.raises(ValueError, match="invalid service"):
        workload_id("example.org", "")
    with pytest.raises(ValueError, match="invalid trust domain"):
        workload_id("Example.org", "users")


def test_validate_trust_domain_hints_at_scheme() -> None:
    assert validate_trust_domain("example.org") == "example.org"
    with pytest.raises(ValueError, match="without 'spiffe://'"):
        validate_trust_domain("spiffe://example.org")


@pytest.mark.parametrize(
    ("pattern", "spiffe_id", "expected"),
    [
        (USERS, USERS, True),
        (USERS, "spiffe://example.org/ns/default/sa/user", False),
        (USERS, "spiffe://example.org/ns/default/sa/users2", False),
        ("example.org/ns/default/sa/users", USERS, True),
        ("example.org/ns/default/sa/users", "spiffe://other.org/ns/default/sa/users", False),
        ("*", USERS, True),
        ("*", "", False),
        ("*/sa/users", USERS, True),
        ("*/sa/users", "spiffe://other.org/x/sa/users", True),
        ("*/sa/users", "spiffe://example.org/ns/default/sa/orders", False),
        ("spiffe://example.org/ns/default/*", USERS, True),
        ("example.org/ns/default/*", USERS, True),
        ("example.org/ns/default/*", "spiffe://example.org/ns/prod/sa/users", False),
        ("spiffe://example.org/*", "spiffe://example.org/a/b/c", True),
        ("spiffe://example.org/ns/default/sa/user*", USERS, True),
        ("spiffe://example.org/ns/*/sa/users", USERS, True),
        ("spiffe://example.org/ns/*/sa/users", "spiffe://example.org/ns/prod/sa/users", True),
        ("spiffe://example.org/ns/*/sa/users", "spiffe://example.org/ns/a/b/sa/users", False),
        ("spiffe://example.org/ns/*/sa/users", "spiffe://example.org/ns//sa/users", False),
        ("spiffe://example.org/ns/*/sa/users", "spiffe://example.org/ns/default/sa/orders", False),
        ("example.org/ns/*/sa/*", "spiffe://example.org/ns/x/sa/y", True),
        # a trailing '*' is always a prefix match, even right after a '/'
        ("example.org/ns/*/sa/*", "spiffe://example.org/ns/x/sa/y/z", True),
        ("spiffe://*/ns/default/sa/users", "spiffe://other.org/ns/default/sa/users", True),
        # a '*' after the scheme wildcards the trust domain only, it is no suffix match
        ("spiffe://*/ns/default/sa/users", "spiffe://x.org/extra/ns/default/sa/users", False),
        ("spiffe://example.org/ns/*/sa/users", "example.org/ns/default/sa/users", False),
        # regex metacharacters in a pattern are literal
        ("example.org/ns/default/sa/us.rs", "spiffe://example.org/ns/default/sa/usXrs", False),
    ],
)
def test_matching(pattern: str, spiffe_id: str, expected: bool) -> None:
    assert spiffe_matches(pattern, spiffe_id) is expected


@pytest.mark.parametrize(
    "pattern", ["", "**", "spiffe://example.org/ns/def*ult/sa/users", "spiffe://*.example.org/a"]
)
def test_malformed_patterns_are_errors(pattern: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        spiffe_matches(pattern, USERS)


_TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
_SEG_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_"
_segments = st.text(alphabet=_SEG_CHARS, min_size=1, max_size=20).filter(
    lambda s: s not in (".", "..")
)
_ids = st.builds(
    lambda td, segments: SpiffeId(td, "".join(f"/{s}" for s in segments)),
    st.text(alphabet=_TD_CHARS, min_size=1, max_size=40),
    st.lists(_segments, max_size=6),
)


@given(_ids)
def test_round_trip(spiffe_id: SpiffeId) -> None:
    assert str(parse_spiffe_id(str(spiffe_id))) == str(spiffe_id)
    assert parse_spiffe_id(str(spiffe_id)) == spiffe_id
    assert spiffe_matches(str(spiffe_id), str(spiffe_id))


@given(st.one_of(st.text(), st.text().map(lambda t: "spiffe://" + t)))
def test_parse_only_raises_value_error(text: str) -> None:
    try:
        parsed = parse_spiffe_id(text)
    except ValueError:
        return
    assert str(parsed) == text
