"""Bad policy is reported with file, line and field path, all problems at once."""

from __future__ import annotations

import textwrap

import pytest

from meshlib.config.load import parse_policy
from meshlib.errors import ConfigError

GOOD = """\
services:
  users:
    endpoints:
      - {address: 127.0.0.1:8001, labels: {version: v1}}
      - {address: 127.0.0.1:8002, labels: {version: v2}, weight: 2}
    subsets: {v1: {version: v1}, v2: {version: v2}}
    routes:
      - name: canary
        match: {headers: {x-canary: "1"}}
        to: [{subset: v2}]
      - name: default
        match: {path: {prefix: /}}
        to: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
"""


def errors_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_policy(textwrap.dedent(text), "mesh.yaml")
    return [(i.line, i.path, i.message) for i in caught.value.issues]


def test_good_policy_parses() -> None:
    config = parse_policy(GOOD, "mesh.yaml")
    assert list(config.services) == ["users"]
    assert config.services["users"].routes[1].to[0].weight == 90


def test_unknown_key_names_line_path_and_allowed_keys() -> None:
    found = errors_of(GOOD.replace("    subsets:", "    subsetz:"))
    assert len(found) == 1
    line, path, message = found[0]
    assert line == 6
    assert path == "services.users.subsetz"
    assert "unknown key 'subsetz'" in message and "subsets" in message


def test_every_problem_reported_at_once() -> None:
    bad = """\
    services:
      users:
        endpoints:
          - {address: 127.0.0.1}
        routes:
          - match: {path: {regex: "("}}
            timeout: 2
            to: [{weight: 0}]
      orders:
        endpoints: [{address: "127.0.0.1:99999"}]
        load_balancer: {policy: fastest}
    """
    found = errors_of(bad)
    by_path = {path: (line, message) for line, path, message in found}
    assert by_path["services.users.endpoints[0].address"][0] == 4
    assert "host:port" in by_path["services.users.endpoints[0].address"][1]
    assert by_path["services.users.routes[0].match.path.regex"][0] == 6
    assert "invalid regex" in by_path["services.users.routes[0].match.path.regex"][1]
    assert by_path["services.users.routes[0].timeout"][0] == 7
    assert "unit" in by_path["services.users.routes[0].timeout"][1]
    assert by_path["services.users.routes[0].to"][0] == 8
    assert "sum to 0" in by_path["services.users.routes[0].to"][1]
    assert by_path["services.orders.endpoints[0].address"][0] == 10
    assert by_path["services.orders.load_balancer.policy"][0] == 11
    assert len(found) == 6


@pytest.mark.parametrize("value", ["2", "fast", "-1s", "1.5.2s", "10 parsecs"])
def test_bad_durations(value: str) -> None:
    found = errors_of(GOOD + f"    timeout: '{value}'\n")
    assert found[0][1] == "services.users.timeout"
    assert found[0][0] == 14


def test_missing_subset_and_service() -> None:
    text = GOOD.replace("to: [{subset: v2}]", "to: [{subset: v3}, {service: payments}]")
    found = errors_of(text)
    assert found[0][:2] == (10, "services.users.routes[0].to[0].subset")
    assert "no subset 'v3'" in found[0][2] and "v1, v2" in found[0][2]
    assert found[1][:2] == (10, "services.users.routes[0].to[1].service")
    assert "unknown service 'payments'" in found[1][2]


def test_yaml_syntax_error_has_line() -> None:
    found = errors_of("services:\n  users: [\n")
    assert found[0][0] is not None
    assert "not valid YAML" in found[0][2]


def test_duplicate_key() -> None:
    found = errors_of("services:\n  users: {}\n  users: {}\n")
    assert found == [(3, "services.users", "duplicate key")]


def test_json_policy_is_accepted() -> None:
    config = parse_policy('{"services": {"users": {"endpoints": [{"address": "[::1]:80"}]}}}')
    assert config.services["users"].endpoints[0].address == "[::1]:80"


def test_prefix_rewrite_needs_prefix_match() -> None:
    text = GOOD.replace(
        "        to: [{subset: v2}]", "        to: [{subset: v2}]\n        rewrite: {prefix: /v2/}"
    )
    found = errors_of(text)
    assert found[0][1] == "services.users.routes[0].rewrite.prefix"
    assert found[0][0] == 11


def test_on_and_off_are_strings_not_booleans() -> None:
    config = parse_policy(
        GOOD + "    retries: {attempts: 3, on: [5xx, reset]}\n    faults: off\n", "mesh.yaml"
    )
    retries = config.services["users"].retries
    assert retries is not None and retries.on == ["5xx", "reset"]
    assert config.services["users"].faults == "off"


def test_uppercase_service_names_are_rejected() -> None:
    found = errors_of(GOOD.replace("  users:", "  Users:"))
    assert found[0][1] == "services.Users"


def test_header_values_must_be_latin1_and_single_line() -> None:
    text = GOOD.replace(
        "        to: [{subset: v2}]",
        '        to: [{subset: v2}]\n        request_headers: {set: {x-a: "caf\\u00e9\\u2603"}, '
        'add: {"bad name": "1"}}',
    )
    found = errors_of(text)
    assert {path for _, path, _ in found} == {
        "services.users.routes[0].request_headers.set",
        "services.users.routes[0].request_headers.add",
    }
