"""Istio-AuthorizationPolicy-style RBAC for inbound requests: pure decisions, no I/O.

Policies are compiled once (patterns become matcher objects at construction) and
``authorize`` runs per request. Evaluation order follows Istio:

1. an enforcing DENY policy that matches denies;
2. AUDIT policies that match are listed and never change the decision;
3. without enforcing ALLOW policies the request is allowed;
4. an enforcing ALLOW policy that matches allows;
5. otherwise the request is denied.

Dry-run policies are evaluated too but only recorded in ``Verdict.would_deny``.

Pattern syntax (principals, request principals, methods, paths, condition values):
``*`` alone matches any non-empty value, a leading ``*`` is a suffix match, a
trailing ``*`` a prefix match, anything else is exact. At most one ``*``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("meshlib.security")

Action = Literal["ALLOW", "DENY", "AUDIT"]
ACTIONS: tuple[Action, ...] = ("ALLOW", "DENY", "AUDIT")

SPIFFE_SCHEME = "spiffe://"

# Reserved names hashed into reason ids for decisions no single policy made; the
# angle brackets keep them apart from names the config model accepts.
_NO_ALLOW_MATCHED = "<no-allow-matched>"
_NO_ALLOW_POLICIES = "<no-allow-policies>"


def reason_id_for(name: str) -> str:
    """The opaque id of a decision: ``rbac-`` and 8 hex digits of sha256 of the policy name.

    It goes into response bodies instead of the policy name; operators map it back
    through the INFO log line of the denial, which names both.
    """
    return "rbac-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


NO_ALLOW_MATCHED_ID = reason_id_for(_NO_ALLOW_MATCHED)
"""Reason id of a denial because ALLOW policies exist and none matched."""

NO_ALLOW_POLICIES_ID = reason_id_for(_NO_ALLOW_POLICIES)
"""Reason id of an allow because there are no enforcing ALLOW policies."""


# --- patterns -------------------------------------------------------------------------


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid wildcard pattern, or None when it is."""
    if not pattern:
        return "empty pattern (use '*' to match any non-empty value)"
    stars = pattern.count("*")
    if stars == 0 or pattern == "*":
        return None
    if stars > 1 or not (pattern.startswith("*") or pattern.endswith("*")):
        return (
            f"bad pattern {pattern!r}: one '*' only, as the first or last character "
            "(prefix*, *suffix) or alone"
        )
    return None


def _check_pattern(pattern: str) -> None:
    problem = pattern_problem(pattern)
    if problem is not None:
        raise ValueError(problem)


def _pattern_matches(pattern: str, value: str) -> bool:
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def principal_matches(pattern: str, value: str) -> bool:
    """Match a SPIFFE ID against a principal pattern.

    A pattern without the ``spiffe://`` scheme (Istio's ``cluster.local/ns/x/sa/y``)
    is compared against the value with its ``spiffe://`` prefix stripped.
    """
    if not pattern.startswith(SPIFFE_SCHEME):
        value = value.removeprefix(SPIFFE_SCHEME)
    return _pattern_matches(pattern, value)


class Patterns:
    """A compiled OR of wildcard patterns: one set lookup and two tuple ``startswith``/
    ``endswith`` calls per value, whatever the number of patterns."""

    __slots__ = ("_any", "_exact", "_prefixes", "_suffixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        match_any = False
        for pattern in patterns:
            _check_pattern(pattern)
            if pattern == "*":
                match_any = True
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
        self._any = match_any
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)
        self._suffixes = tuple(suffixes)

    def __call__(self, value: str) -> bool:
        if not value:
            return False  # every valid pattern needs at least one character
        return (
            self._any
            or value in self._exact
            or value.startswith(self._prefixes)
            or value.endswith(self._suffixes)
        )


class PrincipalPatterns:
    """A compiled OR of principal patterns (see ``principal_matches``)."""

    __slots__ = ("_bare", "_full")

    def __init__(self, patterns: Iterable[str]) -> None:
        listed = list(patterns)
        self._full = Patterns(p for p in listed if p.startswith(SPIFFE_SCHEME))
        self._bare = Patterns(p for p in listed if not p.startswith(SPIFFE_SCHEME))

    def __call__(self, value: str) -> bool:
        return self._full(value) or self._bare(value.removeprefix(SPIFFE_SCHEME))


Matcher = Callable[[str], bool]


def _compile(patterns: tuple[str, ...], principal: bool = False) -> Matcher | None:
    """None for an empty field, so matching can skip it without a call."""
    if not patterns:
        return None
    return PrincipalPatterns(patterns) if principal else Patterns(patterns)


# --- request facts ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What RBAC may look at, already verified and normalised by the caller."""

    method: str  # upper case
    path: str  # without the query string
    port: int | None
    headers: Mapping[str, str]  # lowercase names
    peer: str = ""  # verified SPIFFE ID of the caller; "" for plaintext
    request_principal: str = ""  # "iss/sub" of a verified JWT; "" without one
    claims: Mapping[str, Any] = field(default_factory=dict)


# --- rules --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Who calls: OR within a field, AND across fields; empty fields are ignored."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    _principals: Matcher | None = field(init=False, repr=False, compare=False)
    _not_principals: Matcher | None = field(init=False, repr=False, compare=False)
    _request_principals: Matcher | None = field(init=False, repr=False, compare=False)
    _not_request_principals: Matcher | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "_principals", _compile(self.principals, principal=True))
        setattr_(self, "_not_principals", _compile(self.not_principals, principal=True))
        setattr_(self, "_request_principals", _compile(self.request_principals))
        setattr_(self, "_not_request_principals", _compile(self.not_request_principals))

    def matches(self, facts: RequestFacts) -> bool:
        if self._principals is not None and not self._principals(facts.peer):
            return False
        if self._not_principals is not None and self._not_principals(facts.peer):
            return False
        who = facts.request_principal
        if self._request_principals is not None and not self._request_principals(who):
            return False
        return not (self._not_request_principals is not None and self._not_request_principals(who))


@dataclass(frozen=True, slots=True)
class Operation:
    """What is called: OR within a field, AND across fields; empty fields are ignored."""

    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    _methods: Matcher | None = field(init=False, repr=False, compare=False)
    _not_methods: Matcher | None = field(init=False, repr=False, compare=False)
    _paths: Matcher | None = field(init=False, repr=False, compare=False)
    _not_paths: Matcher | None = field(init=False, repr=False, compare=False)
    _ports: frozenset[int] = field(init=False, repr=False, compare=False)
    _not_ports: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "_methods", _compile(self.methods))
        setattr_(self, "_not_methods", _compile(self.not_methods))
        setattr_(self, "_paths", _compile(self.paths))
        setattr_(self, "_not_paths", _compile(self.not_paths))
        setattr_(self, "_ports", frozenset(self.ports))
        setattr_(self, "_not_ports", frozenset(self.not_ports))

    def matches(self, facts: RequestFacts) -> bool:
        if self._methods is not None and not self._methods(facts.method):
            return False
        if self._not_methods is not None and self._not_methods(facts.method):
            return False
        if self._paths is not None and not self._paths(facts.path):
            return False
        if self._not_paths is not None and self._not_paths(facts.path):
            return False
        if self._ports and facts.port not in self._ports:
            return False
        return not (self._not_ports and facts.port in self._not_ports)


# --- conditions ----------------------------------------------------------------------------

Lookup = Callable[[RequestFacts], Sequence[str] | None]

HEADER_KEY = "request.headers[<name>]"
CLAIM_KEY = "request.auth.claims[<name>]"
CONDITION_KEYS = (HEADER_KEY, CLAIM_KEY, "request.auth.principal", "source.principal")

_HEADER = re.compile(r"request\.headers\[([^\[\]]+)\]")
_CLAIMS = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


def normalize_condition_key(key: str) -> str:
    """The canonical form of a ``when`` key (header names lowercased), or ValueError."""
    if key in ("request.auth.principal", "source.principal"):
        return key
    header = _HEADER.fullmatch(key)
    if header is not None:
        name = header.group(1).lower()
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"bad header name {header.group(1)!r} in condition key {key!r}")
        return f"request.headers[{name}]"
    claims = _CLAIMS.fullmatch(key)
    if claims is not None:
        parts = claims.group(1)[1:-1].split("][")
        if any(not part.strip() or part != part.strip() for part in parts):
            raise ValueError(f"bad claim name in condition key {key!r}")
        return key
    raise ValueError(f"unknown condition key {key!r}: use one of {', '.join(CONDITION_KEYS)}")


def _strings(value: Any) -> Sequence[str] | None:
    """A claim as strings: a string, or the string elements of a list; else nothing."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str)]
    return None


def _claim_lookup(parts: tuple[str, ...], dotted: str | None) -> Lookup:
    def lookup(facts: RequestFacts) -> Sequence[str] | None:
        claims = facts.claims
        # a top-level claim named with dots (URL-style claim names) wins over nesting
        if dotted is not None and dotted in claims:
            return _strings(claims[dotted])
        node: Any = claims
        for part in parts:
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return _strings(node)

    return lookup


def _lookup_for(key: str) -> tuple[Lookup, bool]:
    """How to read the key's values from the facts, and whether they are SPIFFE IDs."""
    if key == "source.principal":
        return (lambda facts: (facts.peer,)), True
    if key == "request.auth.principal":
        return (lambda facts: (facts.request_principal,)), False
    header = _HEADER.fullmatch(key)
    if header is not None:
        name = header.group(1)

        def header_value(facts: RequestFacts) -> Sequence[str] | None:
            value = facts.headers.get(name)
            return None if value is None else (value,)

        return header_value, False
    claims = _CLAIMS.fullmatch(key)
    assert claims is not None  # normalize_condition_key accepted it
    brackets = tuple(claims.group(1)[1:-1].split("]["))
    if len(brackets) == 1 and "." in brackets[0]:
        return _claim_lookup(tuple(brackets[0].split(".")), brackets[0]), False
    return _claim_lookup(brackets, None), False


@dataclass(frozen=True, slots=True)
class Condition:
    """A ``when`` clause: the key's value matches one of ``values`` (when given) and
    none of ``not_values``. An absent header or claim matches no pattern, so it fails
    ``values`` and passes ``not_values``.

    Keys: ``request.headers[<name>]``, ``request.auth.claims[<name>]`` (a string or a
    list of strings, any element counts; ``a.b`` or ``[a][b]`` for nested claims),
    ``request.auth.principal`` and ``source.principal`` (principal matching).
    """

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    _lookup: Lookup = field(init=False, repr=False, compare=False)
    _values: Matcher | None = field(init=False, repr=False, compare=False)
    _not_values: Matcher | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = normalize_condition_key(self.key)
        if not self.values and not self.not_values:
            raise ValueError(f"condition on {key!r} needs values or not_values")
        lookup, principal = _lookup_for(key)
        setattr_ = object.__setattr__
        setattr_(self, "key", key)
        setattr_(self, "_lookup", lookup)
        setattr_(self, "_values", _compile(self.values, principal))
        setattr_(self, "_not_values", _compile(self.not_values, principal))

    def matches(self, facts: RequestFacts) -> bool:
        found = self._lookup(facts)
        if self._values is not None and (
            found is None or not any(self._values(item) for item in found)
        ):
            return False
        return not (
            self._not_values is not None
            and found is not None
            and any(self._not_values(item) for item in found)
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """``from_`` (OR, empty = anyone) AND ``to`` (OR, empty = anything) AND ``when``
    (AND, empty = always). ``Rule()`` matches every request (Istio's ``rules: [{}]``)."""

    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()

    def matches(self, facts: RequestFacts) -> bool:
        if self.from_ and not any(source.matches(facts) for source in self.from_):
            return False
        if self.to and not any(operation.matches(facts) for operation in self.to):
            return False
        return all(condition.matches(facts) for condition in self.when)


@dataclass(frozen=True, slots=True)
class Policy:
    """A named set of rules with an action; matches when any rule matches, so a policy
    without rules matches nothing (an ALLOW without rules allows nothing)."""

    name: str
    action: Action
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    reason_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"policy {self.name!r}: action must be one of {', '.join(ACTIONS)}")
        if self.action == "AUDIT" and self.dry_run:
            raise ValueError(f"policy {self.name!r}: AUDIT never changes a decision; no dry_run")
        object.__setattr__(self, "reason_id", reason_id_for(self.name))

    def matches(self, facts: RequestFacts) -> bool:
        return any(rule.matches(facts) for rule in self.rules)


# --- decision ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision on one request.

    ``reason_id`` is safe for response bodies (see ``reason_id_for``); ``policy`` names
    the deciding policy for logs only (None when no single policy decided);
    ``audited`` lists the AUDIT policies that matched; ``would_deny`` names the dry-run
    policy that would have denied an allowed request (for dry-run ALLOW policies, of
    which none matched: the first of them).
    """

    allowed: bool
    reason_id: str
    policy: str | None = None
    audited: tuple[str, ...] = ()
    would_deny: str | None = None


def authorize(policies: Sequence[Policy], facts: RequestFacts) -> Verdict:
    """Decide one request against every policy, in Istio's order (see the module doc)."""
    audited = tuple(p.name for p in policies if p.action == "AUDIT" and p.matches(facts))
    for policy in policies:
        if policy.action == "DENY" and not policy.dry_run and policy.matches(facts):
            _log_denial(policy.name, policy.reason_id, facts)
            return Verdict(False, policy.reason_id, policy.name, audited)

    allows = [p for p in policies if p.action == "ALLOW" and not p.dry_run]
    if not allows:
        verdict = Verdict(True, NO_ALLOW_POLICIES_ID, None, audited)
    else:
        allowed_by = next((p for p in allows if p.matches(facts)), None)
        if allowed_by is None:
            _log_denial(None, NO_ALLOW_MATCHED_ID, facts)
            return Verdict(False, NO_ALLOW_MATCHED_ID, None, audited)
        verdict = Verdict(True, allowed_by.reason_id, allowed_by.name, audited)

    would_deny = _dry_run_denial(policies, facts)
    if would_deny is None:
        return verdict
    log.info(
        "rbac dry-run would deny: policy=%s%s reason=%s %s %s peer=%s",
        would_deny.name,
        "" if would_deny.action == "DENY" else " (no dry-run ALLOW matched)",
        would_deny.reason_id,
        facts.method,
        facts.path,
        facts.peer or "-",
    )
    return Verdict(True, verdict.reason_id, verdict.policy, audited, would_deny.name)


def _dry_run_denial(policies: Sequence[Policy], facts: RequestFacts) -> Policy | None:
    """The dry-run policy that would have denied: a matching DENY, else the first dry-run
    ALLOW when there are some and none matches."""
    first_allow: Policy | None = None
    for policy in policies:
        if not policy.dry_run:
            continue
        if policy.action == "DENY" and policy.matches(facts):
            return policy
        if policy.action == "ALLOW" and first_allow is None:
            first_allow = policy
    if first_allow is None:
        return None
    dry_allows = (p for p in policies if p.dry_run and p.action == "ALLOW")
    return None if any(p.matches(facts) for p in dry_allows) else first_allow


def _log_denial(policy: str | None, reason_id: str, facts: RequestFacts) -> None:
    # identities and the route only: header values, claims and tokens stay out of logs
    log.info(
        "rbac deny: policy=%s reason=%s %s %s peer=%s",
        policy or "(no ALLOW policy matched)",
        reason_id,
        facts.method,
        facts.path,
        facts.peer or "-",
    )
