"""RBAC for inbound requests: Istio's evaluation order, matching rules, the policy
schema, and a property test against a naive reference evaluator."""

from __future__ import annotations

import logging
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from meshlib.config.authz_model import AuthzPolicies, AuthzPolicyConfig, compile_policies
from meshlib.security.rbac import (
    ACTIONS,
    NO_ALLOW_MATCHED_ID,
    NO_ALLOW_POLICIES_ID,
    Condition,
    Operation,
    Policy,
    RequestFacts,
    Rule,
    Source,
    Verdict,
    authorize,
    principal_matches,
    reason_id_for,
)

FRONTEND = "spiffe://example.org/ns/default/sa/frontend"
BATCH = "spiffe://example.org/ns/default/sa/batch"
OPS = "spiffe://example.org/ns/default/sa/ops"
CALLERS = {"frontend": FRONTEND, "batch": BATCH, "plaintext": ""}

POLICIES = TypeAdapter(AuthzPolicies)


def facts(
    method: str = "GET",
    path: str = "/",
    *,
    peer: str = "",
    port: int | None = 8000,
    headers: Mapping[str, str] | None = None,
    request_principal: str = "",
    claims: Mapping[str, Any] | None = None,
) -> RequestFacts:
    return RequestFacts(
        method=method,
        path=path,
        port=port,
        headers=headers or {},
        peer=peer,
        request_principal=request_principal,
        claims=claims or {},
    )


def load(text: str) -> tuple[Policy, ...]:
    """Policies from the YAML shape of the ``authz:`` block."""
    return compile_policies(POLICIES.validate_python(yaml.safe_load(textwrap.dedent(text))))


def one(action: str, *rules: Rule, name: str = "p", dry_run: bool = False) -> Policy:
    return Policy(name, action, rules, dry_run)  # type: ignore[arg-type]


# --- the matrix ------------------------------------------------------------------------------

MESH_POLICIES = load(
    """\
    - name: deny-admin-unless-ops
      action: DENY
      rules:
        - from: [{not_principals: ["spiffe://example.org/ns/default/sa/ops"]}]
          to: [{paths: ["/admin/*"]}]
    - name: allow-public-reads
      action: allow
      rules:
        - to: [{methods: [get], paths: [/public]}]
    - name: allow-frontend-api
      action: ALLOW
      rules:
        - from: [{principals: ["example.org/ns/default/sa/frontend"]}]
          to: [{paths: ["/api/*"]}]
    - name: allow-batch-api-reads
      action: ALLOW
      rules:
        - from: [{principals: ["*/sa/batch"]}]
          to: [{methods: [GET], paths: ["/api/*"]}]
    """
)

# deny(p) = denied by DENY policy p; deny = no ALLOW policy matched; allow(p) = allowed by p
MATRIX = """
caller     method  /public              /api/orders                /admin/x
frontend   GET     allow(public-reads)  allow(frontend-api)        deny(admin-unless-ops)
frontend   POST    deny                 allow(frontend-api)        deny(admin-unless-ops)
batch      GET     allow(public-reads)  allow(batch-api-reads)     deny(admin-unless-ops)
batch      POST    deny                 deny                       deny(admin-unless-ops)
plaintext  GET     allow(public-reads)  deny                       deny(admin-unless-ops)
plaintext  POST    deny                 deny                       deny(admin-unless-ops)
"""


def matrix_cells() -> list[tuple[str, str, str, str]]:
    header, *rows = MATRIX.strip().splitlines()
    paths = header.split()[2:]
    return [
        (caller, method, path, cell)
        for caller, method, *cells in (row.split() for row in rows)
        for path, cell in zip(paths, cells, strict=True)
    ]


@pytest.mark.parametrize(("caller", "method", "path", "expected"), matrix_cells())
def test_rbac_matrix(caller: str, method: str, path: str, expected: str) -> None:
    verdict = authorize(MESH_POLICIES, facts(method, path, peer=CALLERS[caller]))
    outcome, _, suffix = expected.partition("(")
    assert verdict.allowed is (outcome == "allow")
    if suffix:
        action = "deny" if outcome == "deny" else "allow"
        assert verdict.policy == f"{action}-{suffix.rstrip(')')}"
        assert verdict.reason_id == reason_id_for(verdict.policy)
    else:
        assert verdict.policy is None
        assert verdict.reason_id == NO_ALLOW_MATCHED_ID


def test_matrix_covers_every_cell() -> None:
    assert len(matrix_cells()) == len(CALLERS) * 2 * 3


def test_ops_passes_the_admin_deny_but_still_needs_an_allow() -> None:
    verdict = authorize(MESH_POLICIES, facts("GET", "/admin/x", peer=OPS))
    assert not verdict.allowed
    assert verdict.policy is None  # not the DENY: no ALLOW matched


# --- evaluation order ------------------------------------------------------------------------


def test_deny_beats_allow() -> None:
    policies = (
        one("ALLOW", Rule(), name="allow-all"),
        one("DENY", Rule(to=(Operation(methods=("DELETE",)),)), name="no-deletes"),
    )
    assert authorize(policies, facts("GET")).allowed
    verdict = authorize(policies, facts("DELETE"))
    assert not verdict.allowed
    assert verdict.policy == "no-deletes"


def test_no_allow_policies_allows_by_default() -> None:
    policies = (one("DENY", Rule(to=(Operation(paths=("/admin/*",)),))),)
    verdict = authorize(policies, facts("GET", "/orders"))
    assert verdict == Verdict(True, NO_ALLOW_POLICIES_ID)
    assert authorize((), facts()).allowed


def test_an_allow_policy_that_matches_nothing_denies() -> None:
    for policy in (
        one("ALLOW"),  # no rules: Istio's "allow nothing"
        one("ALLOW", Rule(to=(Operation(paths=("/elsewhere",)),))),
    ):
        verdict = authorize((policy,), facts("GET", "/orders"))
        assert not verdict.allowed
        assert verdict.reason_id == NO_ALLOW_MATCHED_ID


def test_deny_without_rules_matches_nothing() -> None:
    assert authorize((one("DENY"),), facts()).allowed


def test_empty_rule_matches_everything() -> None:
    policies = load(
        """\
        - {name: deny-all, action: DENY, rules: [{}]}
        """
    )
    assert policies[0].rules == (Rule(),)
    for request in (facts(), facts("POST", "/x", peer=FRONTEND, port=None)):
        assert not authorize(policies, request).allowed
    assert authorize((one("ALLOW", Rule()),), facts(peer="")).allowed


def test_audit_is_listed_and_never_changes_the_outcome() -> None:
    audit = one("AUDIT", Rule(to=(Operation(paths=("/api/*",)),)), name="audit-api")
    other = one("AUDIT", Rule(to=(Operation(paths=("/other",)),)), name="audit-other")
    for policies in ((), (one("DENY", Rule(), name="deny"),), (one("ALLOW"),)):
        without = authorize(policies, facts("GET", "/api/orders"))
        with_audit = authorize((audit, *policies, other), facts("GET", "/api/orders"))
        assert with_audit.allowed == without.allowed
        assert with_audit.policy == without.policy
        assert with_audit.audited == ("audit-api",)
        assert without.audited == ()


def test_dry_run_deny_only_sets_would_deny(caplog: pytest.LogCaptureFixture) -> None:
    trial = one("DENY", Rule(to=(Operation(methods=("POST",)),)), name="trial", dry_run=True)
    caplog.set_level(logging.INFO, logger="meshlib.security")
    verdict = authorize((trial,), facts("POST"))
    assert verdict.allowed
    assert verdict.would_deny == "trial"
    assert verdict.reason_id == NO_ALLOW_POLICIES_ID
    assert "would deny" in caplog.text and "trial" in caplog.text
    assert authorize((trial,), facts("GET")).would_deny is None
    # a request that is denied anyway has nothing a dry run could change
    denied = authorize((trial, one("DENY", Rule(), name="deny")), facts("POST"))
    assert not denied.allowed and denied.would_deny is None


def test_dry_run_allow_only_sets_would_deny() -> None:
    trial_a = one("ALLOW", Rule(to=(Operation(paths=("/a",)),)), name="trial-a", dry_run=True)
    trial_b = one("ALLOW", Rule(to=(Operation(paths=("/b",)),)), name="trial-b", dry_run=True)
    # dry-run ALLOWs are not enforcing: without enforcing ALLOWs everything is allowed
    verdict = authorize((trial_a, trial_b), facts("GET", "/c"))
    assert verdict.allowed and verdict.policy is None
    assert verdict.would_deny == "trial-a"  # none matched: the first names the set
    assert authorize((trial_a, trial_b), facts("GET", "/b")).would_deny is None
    enforcing = one("ALLOW", Rule(), name="allow-all")
    verdict = authorize((enforcing, trial_a), facts("GET", "/c"))
    assert verdict.allowed and verdict.policy == "allow-all" and verdict.would_deny == "trial-a"


def test_dry_run_deny_wins_over_dry_run_allow_for_would_deny() -> None:
    policies = (
        one("ALLOW", Rule(to=(Operation(paths=("/a",)),)), name="trial-allow", dry_run=True),
        one("DENY", Rule(), name="trial-deny", dry_run=True),
    )
    assert authorize(policies, facts("GET", "/c")).would_deny == "trial-deny"


# --- matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", FRONTEND, True),
        ("*", "", False),  # any *authenticated* caller
        (FRONTEND, FRONTEND, True),
        (FRONTEND, BATCH, False),
        ("example.org/ns/default/sa/frontend", FRONTEND, True),  # Istio style, no scheme
        ("example.org/ns/default/sa/*", BATCH, True),
        ("spiffe://example.org/ns/default/*", BATCH, True),
        ("spiffe://other.org/*", BATCH, False),
        ("*/sa/batch", BATCH, True),
        ("*/sa/batch", FRONTEND, False),
        ("example.org/*", "", False),
        (
            "spiffe://example.org/ns/default/sa/frontend",
            "example.org/ns/default/sa/frontend",
            False,
        ),
    ],
)
def test_principal_matches(pattern: str, value: str, expected: bool) -> None:
    assert principal_matches(pattern, value) is expected
    source = Source(principals=(pattern,))
    assert source.matches(facts(peer=value)) is expected


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/api/orders", "/api/orders", True),
        ("/api/orders", "/api/orders/1", False),
        ("/api/*", "/api/orders", True),
        ("/api/*", "/api", False),
        ("*.json", "/data/x.json", True),
        ("*.json", "/data/x.jsonp", False),
        ("*", "/anything", True),
    ],
)
def test_path_patterns(pattern: str, path: str, expected: bool) -> None:
    assert Operation(paths=(pattern,)).matches(facts("GET", path)) is expected


def test_request_principal_wildcards() -> None:
    alice = "https://issuer.example/alice"
    cases = {
        "https://issuer.example/*": {alice: True, "https://evil.example/alice": False, "": False},
        "*/alice": {alice: True, "https://issuer.example/bob": False, "": False},
        "*": {alice: True, "": False},  # any verified JWT
        alice: {alice: True, alice + "x": False},
    }
    for pattern, expected in cases.items():
        source = Source(request_principals=(pattern,))
        for principal, outcome in expected.items():
            assert source.matches(facts(request_principal=principal)) is outcome, (
                pattern,
                principal,
            )
    # not_request_principals: ["*"] is how to say "no JWT"
    anonymous = Source(not_request_principals=("*",))
    assert anonymous.matches(facts(request_principal=""))
    assert not anonymous.matches(facts(request_principal=alice))


def test_jwt_claim_conditions() -> None:
    claims: dict[str, Any] = {
        "iss": "https://issuer.example",
        "scope": "orders:read",
        "groups": ["dev", "admins"],
        "realm": {"roles": ["reader", "writer"], "tier": "gold"},
        "https://example.com/roles": ["auditor"],
        "email_verified": True,
    }

    def passes(key: str, values: Sequence[str] = (), not_values: Sequence[str] = ()) -> bool:
        condition = Condition(key, tuple(values), tuple(not_values))
        return condition.matches(facts(claims=claims))

    assert passes("request.auth.claims[scope]", ["orders:*"])
    assert not passes("request.auth.claims[scope]", ["orders:write"])
    assert passes("request.auth.claims[groups]", ["admins"])  # any list element counts
    assert not passes("request.auth.claims[groups]", ["ops"])
    assert not passes("request.auth.claims[groups]", not_values=["dev"])
    assert passes("request.auth.claims[realm.roles]", ["writer"])  # nested with dots
    assert passes("request.auth.claims[realm][roles]", ["reader"])  # Istio's nested form
    assert passes("request.auth.claims[realm.tier]", ["gold"])
    assert not passes("request.auth.claims[realm.roles]", ["admin"])
    assert passes("request.auth.claims[https://example.com/roles]", ["auditor"])  # dotted name
    assert not passes("request.auth.claims[email_verified]", ["*"])  # strings only
    assert not passes("request.auth.claims[missing]", ["*"])
    assert passes("request.auth.claims[missing]", not_values=["*"])
    assert not passes("request.auth.claims[realm]", ["*"])  # an object is not a string


def test_claims_in_a_policy() -> None:
    policies = load(
        """\
        - name: admins-only
          action: ALLOW
          rules:
            - from: [{request_principals: ["https://issuer.example/*"]}]
              when:
                - {key: "request.auth.claims[realm.roles]", values: [admin]}
                - {key: "request.auth.claims[groups]", not_values: [suspended]}
        """
    )

    def decide(claims: dict[str, Any], principal: str = "https://issuer.example/u1") -> bool:
        return authorize(policies, facts(request_principal=principal, claims=claims)).allowed

    assert decide({"realm": {"roles": ["reader", "admin"]}, "groups": ["staff"]})
    assert decide({"realm": {"roles": "admin"}})
    assert not decide({"realm": {"roles": ["admin"]}, "groups": ["staff", "suspended"]})
    assert not decide({"realm": {"roles": ["reader"]}})
    assert not decide({"realm": {"roles": ["admin"]}}, principal="")


def test_header_conditions() -> None:
    prod = Condition("request.headers[x-env]", values=("prod", "prod-*"))
    assert prod.matches(facts(headers={"x-env": "prod"}))
    assert prod.matches(facts(headers={"x-env": "prod-eu"}))
    assert not prod.matches(facts(headers={"x-env": "staging"}))
    assert not prod.matches(facts())  # absent header
    not_debug = Condition("request.headers[x-debug]", not_values=("*",))
    assert not_debug.matches(facts())
    assert not not_debug.matches(facts(headers={"x-debug": "1"}))
    both = Condition("request.headers[x-env]", values=("prod-*",), not_values=("*-cn",))
    assert both.matches(facts(headers={"x-env": "prod-eu"}))
    assert not both.matches(facts(headers={"x-env": "prod-cn"}))
    # names are case-insensitive in HTTP; facts carry them lowercased
    assert Condition("request.headers[X-Env]", ("prod",)).key == "request.headers[x-env]"


def test_principal_conditions() -> None:
    source = Condition("source.principal", values=("example.org/ns/default/sa/*",))
    assert source.matches(facts(peer=FRONTEND))
    assert not source.matches(facts(peer=""))
    jwt = Condition("request.auth.principal", not_values=("https://issuer.example/bot-*",))
    assert jwt.matches(facts(request_principal="https://issuer.example/alice"))
    assert not jwt.matches(facts(request_principal="https://issuer.example/bot-1"))


def test_not_fields() -> None:
    plaintext_only = Source(not_principals=("*",))
    assert plaintext_only.matches(facts(peer=""))
    assert not plaintext_only.matches(facts(peer=FRONTEND))
    not_batch = Source(principals=("*",), not_principals=("*/sa/batch",))
    assert not_batch.matches(facts(peer=FRONTEND))
    assert not not_batch.matches(facts(peer=BATCH))
    assert not not_batch.matches(facts(peer=""))

    writes = Operation(not_methods=("GET", "HEAD"))
    assert writes.matches(facts("POST")) and not writes.matches(facts("GET"))
    outside = Operation(paths=("/api/*",), not_paths=("/api/health", "*.json"))
    assert outside.matches(facts("GET", "/api/orders"))
    assert not outside.matches(facts("GET", "/api/health"))
    assert not outside.matches(facts("GET", "/api/orders.json"))
    ports = Operation(ports=(8000, 8001))
    assert ports.matches(facts(port=8001)) and not ports.matches(facts(port=9000))
    assert not ports.matches(facts(port=None))
    not_admin_port = Operation(not_ports=(9000,))
    assert not_admin_port.matches(facts(port=8000)) and not_admin_port.matches(facts(port=None))
    assert not not_admin_port.matches(facts(port=9000))


def test_fields_and_entries_combine() -> None:
    # AND across fields of one operation, OR across operations, AND across conditions
    rule = Rule(
        to=(Operation(methods=("GET",), paths=("/a",)), Operation(methods=("POST",))),
        when=(
            Condition("request.headers[x-a]", ("1",)),
            Condition("request.headers[x-b]", ("2",)),
        ),
    )
    both = {"x-a": "1", "x-b": "2"}
    assert rule.matches(facts("GET", "/a", headers=both))
    assert rule.matches(facts("POST", "/z", headers=both))
    assert not rule.matches(facts("GET", "/z", headers=both))
    assert not rule.matches(facts("GET", "/a", headers={"x-a": "1"}))


# --- reason ids and logs ---------------------------------------------------------------------


def test_reason_id_is_stable_and_does_not_leak_the_policy_name() -> None:
    name = "deny-admin-unless-ops"
    policy = one("DENY", Rule(), name=name)
    verdict = authorize((policy,), facts())
    assert verdict.reason_id == authorize((policy,), facts("POST", "/x")).reason_id
    assert verdict.reason_id == reason_id_for(name) == "rbac-3754a1a1"
    assert re.fullmatch(r"rbac-[0-9a-f]{8}", verdict.reason_id)
    assert name not in verdict.reason_id and "admin" not in verdict.reason_id
    assert reason_id_for("another") != verdict.reason_id
    assert NO_ALLOW_MATCHED_ID != NO_ALLOW_POLICIES_ID
    assert re.fullmatch(r"rbac-[0-9a-f]{8}", NO_ALLOW_MATCHED_ID)


def test_denials_are_logged_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    policy = one(
        "DENY", Rule(when=(Condition("request.headers[authorization]", ("*",)),)), name="no-basic"
    )
    caplog.set_level(logging.INFO, logger="meshlib.security")
    request = facts(
        "POST",
        "/orders",
        peer=FRONTEND,
        headers={"authorization": "Bearer s3cr3t-token"},
        claims={"email": "alice@example.com"},
    )
    verdict = authorize((policy,), request)
    assert not verdict.allowed
    [record] = caplog.records
    assert record.levelno == logging.INFO and record.name == "meshlib.security"
    message = record.getMessage()
    assert "no-basic" in message and verdict.reason_id in message
    assert "POST" in message and "/orders" in message
    assert "s3cr3t" not in message and "alice@example.com" not in message


def test_allowed_requests_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib.security")
    authorize(MESH_POLICIES, facts("GET", "/public"))
    assert caplog.records == []


# --- building policies -------------------------------------------------------------------------


def test_rule_types_reject_bad_input_when_built_directly() -> None:
    with pytest.raises(ValueError, match="bad pattern"):
        Operation(paths=("/a/*/b",))
    with pytest.raises(ValueError, match="empty pattern"):
        Source(principals=("",))
    with pytest.raises(ValueError, match="unknown condition key"):
        Condition("request.query[x]", ("1",))
    with pytest.raises(ValueError, match="values or not_values"):
        Condition("request.headers[x]")
    with pytest.raises(ValueError, match="action"):
        Policy("p", "REJECT")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="AUDIT"):
        Policy("p", "AUDIT", dry_run=True)


def test_policy_file_shape_compiles() -> None:
    [policy] = load(
        """\
        - name: deny-admin-from-others
          action: deny
          dry_run: true
          rules:
            - from:
                - principals: ["spiffe://example.org/ns/default/sa/*"]
                  not_principals: ["spiffe://example.org/ns/default/sa/ops"]
                  request_principals: ["https://issuer.example/*"]
                  not_request_principals: ["*/bot"]
              to:
                - methods: [get, Post]
                  not_methods: [DELETE]
                  paths: ["/admin/*"]
                  not_paths: ["*.css"]
                  ports: [8001]
                  not_ports: [9000]
              when:
                - {key: "request.headers[X-Env]", values: [prod], not_values: [dev]}
        """
    )
    assert policy.action == "DENY" and policy.dry_run
    [rule] = policy.rules
    assert rule.from_[0].not_request_principals == ("*/bot",)
    assert rule.to[0].methods == ("GET", "POST")
    assert rule.to[0].ports == (8001,)
    assert rule.when[0].key == "request.headers[x-env]"
    request = facts(
        "GET",
        "/admin/users",
        port=8001,
        peer=FRONTEND,
        request_principal="https://issuer.example/alice",
        headers={"x-env": "prod"},
    )
    assert policy.matches(request)
    assert authorize((policy,), request).would_deny == "deny-admin-from-others"


def config_errors(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        POLICIES.validate_python(data)
    return [
        (".".join(str(part) for part in error["loc"]), error["msg"])
        for error in caught.value.errors()
    ]


def test_config_unknown_keys_are_errors() -> None:
    assert config_errors([{"name": "a", "action": "ALLOW", "rulez": []}]) == [
        ("0.rulez", "Extra inputs are not permitted")
    ]
    [(where, _)] = config_errors([{"name": "a", "action": "ALLOW", "rules": [{"from_": []}]}])
    assert where == "0.rules.0.from_"  # the YAML key is `from`
    [(where, _)] = config_errors(
        [{"name": "a", "action": "ALLOW", "rules": [{"to": [{"path": ["/x"]}]}]}]
    )
    assert where == "0.rules.0.to.0.path"


def test_config_bad_action() -> None:
    [(where, message)] = config_errors([{"name": "a", "action": "REJECT"}])
    assert where == "0.action"
    assert "'ALLOW', 'DENY' or 'AUDIT'" in message
    assert AuthzPolicyConfig.model_validate({"name": "a", "action": "audit"}).action == "AUDIT"


@pytest.mark.parametrize("pattern", ["/a/*/b", "**", "*a*", "a*b", ""])
def test_config_bad_pattern(pattern: str) -> None:
    [(where, message)] = config_errors(
        [{"name": "a", "action": "ALLOW", "rules": [{"to": [{"paths": ["/ok", pattern]}]}]}]
    )
    assert where == "0.rules.0.to.0.paths.1"
    assert "pattern" in message
    if pattern:
        assert repr(pattern) in message and "prefix*" in message


def test_config_bad_when_key() -> None:
    [(where, message)] = config_errors(
        [
            {
                "name": "a",
                "action": "ALLOW",
                "rules": [{"when": [{"key": "request.header[x-env]", "values": ["prod"]}]}],
            }
        ]
    )
    assert where == "0.rules.0.when.0.key"
    assert "unknown condition key 'request.header[x-env]'" in message
    assert "request.headers[<name>]" in message and "request.auth.claims[<name>]" in message
    [(_, message)] = config_errors(
        [
            {
                "name": "a",
                "action": "ALLOW",
                "rules": [{"when": [{"key": "request.headers[bad name]", "values": ["x"]}]}],
            }
        ]
    )
    assert "bad header name 'bad name'" in message


@pytest.mark.parametrize(
    ("data", "where", "fragment"),
    [
        ([{"name": "", "action": "ALLOW"}], "0.name", "non-empty"),
        (
            [{"name": "a", "action": "ALLOW"}, {"name": "a", "action": "DENY"}],
            "",
            "duplicate policy name 'a' (entries 0 and 1)",
        ),
        ([{"name": "a", "action": "AUDIT", "dry_run": True}], "0.dry_run", "AUDIT"),
        ([{"name": "a", "action": "DENY", "rules": [{"to": [{"ports": [0]}]}]}], "", "1"),
        ([{"name": "a", "action": "DENY", "rules": [{"to": [{"ports": [70000]}]}]}], "", "65535"),
        ([{"name": "a", "action": "DENY", "rules": [{"to": [{"methods": ["G T"]}]}]}], "", "GET"),
        ([{"name": "a", "action": "DENY", "rules": [{"from": [{}]}]}], "", "empty source"),
        ([{"name": "a", "action": "DENY", "rules": [{"to": [{}]}]}], "", "empty operation"),
        (
            [{"name": "a", "action": "DENY", "rules": [{"when": [{"key": "source.principal"}]}]}],
            "",
            "values or not_values",
        ),
    ],
)
def test_config_errors_say_what_is_wrong(data: Any, where: str, fragment: str) -> None:
    [(found_where, message)] = config_errors(data)
    assert fragment in message
    if where:
        assert found_where == where


def test_compile_rejects_duplicate_names() -> None:
    config = AuthzPolicyConfig.model_validate({"name": "a", "action": "ALLOW"})
    with pytest.raises(ValueError, match="duplicate"):
        compile_policies([config, config])


# --- properties against a naive reference ------------------------------------------------------


def ref_pattern(pattern: str, value: str) -> bool:
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def ref_principal(pattern: str, value: str) -> bool:
    if not pattern.startswith("spiffe://"):
        value = value.removeprefix("spiffe://")
    return ref_pattern(pattern, value)


def ref_field(patterns: Sequence[Any], negated: bool, check: Any, value: Any) -> bool:
    """One field: an empty list imposes nothing."""
    if not patterns:
        return True
    hit = False
    for pattern in patterns:
        if check(pattern, value):
            hit = True
    return not hit if negated else hit


def ref_claim(claims: Mapping[str, Any], inner: str) -> list[str] | None:
    names = inner.split("][")
    if len(names) == 1 and names[0] in claims:
        node: Any = claims[names[0]]
    else:
        if len(names) == 1:
            names = names[0].split(".")
        node = claims
        for name in names:
            if not isinstance(node, dict) or name not in node:
                return None
            node = node[name]
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [item for item in node if isinstance(item, str)]
    return None


def ref_condition(condition: Condition, request: RequestFacts) -> bool:
    key = condition.key
    check = ref_pattern
    found: list[str] | None
    if key == "source.principal":
        found, check = [request.peer], ref_principal
    elif key == "request.auth.principal":
        found = [request.request_principal]
    elif key.startswith("request.headers["):
        name = key[len("request.headers[") : -1]
        found = [request.headers[name]] if name in request.headers else None
    else:
        found = ref_claim(request.claims, key[len("request.auth.claims[") : -1])
    if condition.values:
        if found is None:
            return False
        if not any(check(p, v) for p in condition.values for v in found):
            return False
    return not (
        condition.not_values
        and found is not None
        and any(check(p, v) for p in condition.not_values for v in found)
    )


def ref_source(source: Source, request: RequestFacts) -> bool:
    peer, who = request.peer, request.request_principal
    return (
        ref_field(source.principals, False, ref_principal, peer)
        and ref_field(source.not_principals, True, ref_principal, peer)
        and ref_field(source.request_principals, False, ref_pattern, who)
        and ref_field(source.not_request_principals, True, ref_pattern, who)
    )


def ref_operation(operation: Operation, request: RequestFacts) -> bool:
    def same(port: int, value: int | None) -> bool:
        return port == value

    return (
        ref_field(operation.methods, False, ref_pattern, request.method)
        and ref_field(operation.not_methods, True, ref_pattern, request.method)
        and ref_field(operation.paths, False, ref_pattern, request.path)
        and ref_field(operation.not_paths, True, ref_pattern, request.path)
        and ref_field(operation.ports, False, same, request.port)
        and ref_field(operation.not_ports, True, same, request.port)
    )


def ref_matches(policy: Policy, request: RequestFacts) -> bool:
    for rule in policy.rules:
        sources = not rule.from_ or any(ref_source(s, request) for s in rule.from_)
        operations = not rule.to or any(ref_operation(o, request) for o in rule.to)
        conditions = all(ref_condition(c, request) for c in rule.when)
        if sources and operations and conditions:
            return True
    return False


def ref_authorize(policies: Sequence[Policy], request: RequestFacts) -> Verdict:
    audited = tuple(p.name for p in policies if p.action == "AUDIT" and ref_matches(p, request))
    for policy in policies:
        if policy.action == "DENY" and not policy.dry_run and ref_matches(policy, request):
            return Verdict(False, reason_id_for(policy.name), policy.name, audited)
    allows = [p for p in policies if p.action == "ALLOW" and not p.dry_run]
    if not allows:
        decided = Verdict(True, NO_ALLOW_POLICIES_ID, None, audited)
    else:
        matched = [p for p in allows if ref_matches(p, request)]
        if not matched:
            return Verdict(False, NO_ALLOW_MATCHED_ID, None, audited)
        decided = Verdict(True, reason_id_for(matched[0].name), matched[0].name, audited)
    dry_denies = [p for p in policies if p.dry_run and p.action == "DENY"]
    dry_allows = [p for p in policies if p.dry_run and p.action == "ALLOW"]
    would_deny = None
    for policy in dry_denies:
        if ref_matches(policy, request):
            would_deny = policy.name
            break
    if would_deny is None and dry_allows and not any(ref_matches(p, request) for p in dry_allows):
        would_deny = dry_allows[0].name
    return Verdict(True, decided.reason_id, decided.policy, audited, would_deny)


def shapes_of(values: Sequence[str]) -> list[str]:
    """Every pattern the values suggest: exact, ``prefix*``, ``*suffix``, and ``*``."""
    found = {"*"}
    for value in values:
        found.add(value)
        for cut in range(1, len(value)):
            found.update((value[:cut] + "*", "*" + value[cut:]))
    return sorted(found)


# small alphabets so that generated patterns and requests meet often; sampling from
# precomputed pools keeps generation cheap
PEER_VALUES = ["", FRONTEND, BATCH, "spiffe://x/a", "spiffe://x/b", "x/a", "a", "spiffe://a"]
ISSUER_VALUES = ["", "i/a", "i/b", "j/a"]
METHOD_VALUES = ["GET", "POST", "PUT"]
PATH_VALUES = ["/", "/a", "/a/b", "/a.b", "/b/a", "/ab"]
SHORT_VALUES = ["a", "b", "ab", "ba", "aa"]
CONDITION_KEYS = [
    "request.headers[x-a]",
    "request.auth.claims[role]",
    "request.auth.claims[realm.roles]",
    "request.auth.claims[realm][roles]",
    "request.auth.principal",
    "source.principal",
]


def pattern_list(values: Sequence[str]) -> st.SearchStrategy[tuple[str, ...]]:
    pool = shapes_of([value for value in values if value])
    return st.lists(st.sampled_from(pool), max_size=2).map(tuple)


PORT_LIST = st.lists(st.integers(1, 3), max_size=2).map(tuple)
sources = st.builds(
    Source,
    principals=pattern_list(PEER_VALUES),
    not_principals=pattern_list(PEER_VALUES),
    request_principals=pattern_list(ISSUER_VALUES),
    not_request_principals=pattern_list(ISSUER_VALUES),
)
operations = st.builds(
    Operation,
    methods=pattern_list(METHOD_VALUES),
    not_methods=pattern_list(METHOD_VALUES),
    paths=pattern_list(PATH_VALUES),
    not_paths=pattern_list(PATH_VALUES),
    ports=PORT_LIST,
    not_ports=PORT_LIST,
)


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    key = draw(st.sampled_from(CONDITION_KEYS))
    pool = PEER_VALUES if key == "source.principal" else SHORT_VALUES + ISSUER_VALUES
    values = draw(pattern_list(pool))
    not_values = draw(pattern_list(pool))
    if not values and not not_values:
        values = ("*",)
    return Condition(key, values, not_values)


rules = st.builds(
    Rule,
    from_=st.lists(sources, max_size=2).map(tuple),
    to=st.lists(operations, max_size=2).map(tuple),
    when=st.lists(conditions(), max_size=2).map(tuple),
)


@st.composite
def policy_sets(draw: st.DrawFn) -> tuple[Policy, ...]:
    policies = []
    for index in range(draw(st.integers(0, 5))):
        action = draw(st.sampled_from(ACTIONS))
        dry_run = action != "AUDIT" and draw(st.booleans())
        chosen = tuple(draw(st.lists(rules, max_size=2)))
        policies.append(Policy(f"p{index}", action, chosen, dry_run))
    return tuple(policies)


SHORT = st.sampled_from(SHORT_VALUES)
CLAIM_VALUES = st.one_of(SHORT, st.lists(SHORT, max_size=2), st.integers(0, 1))


@st.composite
def requests(draw: st.DrawFn) -> RequestFacts:
    claims: dict[str, Any] = draw(st.dictionaries(st.just("role"), CLAIM_VALUES))
    realm = draw(st.sampled_from(["none", "nested", "dotted", "both"]))
    if realm in ("nested", "both"):
        claims["realm"] = {"roles": draw(CLAIM_VALUES)}
    if realm in ("dotted", "both"):
        claims["realm.roles"] = draw(CLAIM_VALUES)
    return RequestFacts(
        method=draw(st.sampled_from(METHOD_VALUES)),
        path=draw(st.sampled_from(PATH_VALUES)),
        port=draw(st.one_of(st.none(), st.integers(1, 3))),
        headers=draw(st.dictionaries(st.sampled_from(["x-a", "x-b"]), SHORT)),
        peer=draw(st.sampled_from(PEER_VALUES)),
        request_principal=draw(st.sampled_from(ISSUER_VALUES)),
        claims=claims,
    )


@settings(max_examples=300, deadline=None)
@given(policy_sets(), requests())
def test_authorize_agrees_with_the_reference(
    policies: tuple[Policy, ...], request: RequestFacts
) -> None:
    verdict = authorize(policies, request)
    assert authorize(policies, request) == verdict  # deterministic
    assert verdict == ref_authorize(policies, request)


@settings(max_examples=100, deadline=None)
@given(policy_sets(), requests(), st.integers(0, 5))
def test_a_match_all_deny_always_denies(
    policies: tuple[Policy, ...], request: RequestFacts, at: int
) -> None:
    deny_all = Policy("deny-all", "DENY", (Rule(),))
    extended = (*policies[:at], deny_all, *policies[at:])
    verdict = authorize(extended, request)
    assert not verdict.allowed
    assert verdict.would_deny is None


@settings(max_examples=100, deadline=None)
@given(policy_sets(), requests())
def test_without_allow_policies_only_a_deny_denies(
    policies: tuple[Policy, ...], request: RequestFacts
) -> None:
    no_allows = tuple(p for p in policies if p.action != "ALLOW")
    verdict = authorize(no_allows, request)
    deny_matches = any(
        p.action == "DENY" and not p.dry_run and ref_matches(p, request) for p in no_allows
    )
    assert verdict.allowed is not deny_matches
    if not verdict.allowed:
        assert any(p.name == verdict.policy and p.action == "DENY" for p in no_allows)
