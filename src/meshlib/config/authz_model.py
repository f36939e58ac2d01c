"""Policy schema for inbound authorization (``authz:``), shaped like Istio's
AuthorizationPolicy, and its compilation into ``meshlib.security.rbac`` policies.

```yaml
authz:
  - name: deny-admin-from-others
    action: DENY                    # ALLOW | DENY | AUDIT (any case)
    dry_run: false
    rules:
      - from: [{not_principals: ["spiffe://example.org/ns/default/sa/ops"]}]
        to: [{paths: ["/admin/*"]}]
        when: [{key: "request.headers[x-env]", values: [prod]}]
```
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from meshlib.config.types import Strict
from meshlib.security.rbac import (
    Condition,
    Operation,
    Policy,
    Rule,
    Source,
    normalize_condition_key,
    pattern_problem,
)

_METHOD = re.compile(r"[A-Z0-9_*-]+")
# no control characters or surrounding blanks: names end up in log lines
_NAME = re.compile(r"[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?")


def _pattern(value: str) -> str:
    problem = pattern_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _method(value: str) -> str:
    if not _METHOD.fullmatch(value):
        raise ValueError(f"bad method {value!r}: use an HTTP method such as GET or POST")
    return _pattern(value)


Pattern = Annotated[str, AfterValidator(_pattern)]
"""Exact, ``prefix*``, ``*suffix`` or ``*`` (any non-empty value)."""

Method = Annotated[str, BeforeValidator(_upper), AfterValidator(_method)]
Port = Annotated[int, Field(ge=1, le=65535)]
Action = Annotated[Literal["ALLOW", "DENY", "AUDIT"], BeforeValidator(_upper)]


class SourceConfig(Strict):
    """Who calls; OR within a field, AND across fields."""

    principals: list[Pattern] = Field(default_factory=list)
    not_principals: list[Pattern] = Field(default_factory=list)
    request_principals: list[Pattern] = Field(default_factory=list)
    not_request_principals: list[Pattern] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> SourceConfig:
        if not (
            self.principals
            or self.not_principals
            or self.request_principals
            or self.not_request_principals
        ):
            raise ValueError("an empty source matches anyone: set a field or leave `from` out")
        return self


class OperationConfig(Strict):
    """What is called; OR within a field, AND across fields."""

    methods: list[Method] = Field(default_factory=list)
    not_methods: list[Method] = Field(default_factory=list)
    paths: list[Pattern] = Field(default_factory=list)
    not_paths: list[Pattern] = Field(default_factory=list)
    ports: list[Port] = Field(default_factory=list)
    not_ports: list[Port] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> OperationConfig:
        if not (
            self.methods
            or self.not_methods
            or self.paths
            or self.not_paths
            or self.ports
            or self.not_ports
        ):
            raise ValueError("an empty operation matches anything: set a field or leave `to` out")
        return self


class ConditionConfig(Strict):
    """``key`` is ``request.headers[<name>]``, ``request.auth.claims[<name>]`` (nested:
    ``a.b``), ``request.auth.principal`` or ``source.principal``."""

    key: str
    values: list[Pattern] = Field(default_factory=list)
    not_values: list[Pattern] = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _known_key(cls, value: str) -> str:
        return normalize_condition_key(value)

    @model_validator(mode="after")
    def _has_values(self) -> ConditionConfig:
        if not self.values and not self.not_values:
            raise ValueError("a condition needs values or not_values")
        return self


class RuleConfig(Strict):
    """Matches when ``from`` AND ``to`` AND every ``when`` match; ``{}`` matches all."""

    from_: list[SourceConfig] = Field(default_factory=list, alias="from")
    to: list[OperationConfig] = Field(default_factory=list)
    when: list[ConditionConfig] = Field(default_factory=list)


class AuthzPolicyConfig(Strict):
    """One policy; without rules it matches nothing (an ALLOW without rules allows
    nothing, ``rules: [{}]`` matches every request)."""

    name: str
    action: Action
    dry_run: bool = False
    rules: list[RuleConfig] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                "policy names must be non-empty, without control characters or "
                "leading/trailing blanks"
            )
        return value

    @field_validator("dry_run")
    @classmethod
    def _audit_is_never_dry(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("action") == "AUDIT":
            raise ValueError("dry_run has no meaning for AUDIT: audits never change a decision")
        return value


def _unique_names(policies: list[AuthzPolicyConfig]) -> list[AuthzPolicyConfig]:
    seen: dict[str, int] = {}
    for index, policy in enumerate(policies):
        first = seen.setdefault(policy.name, index)
        if first != index:
            raise ValueError(
                f"duplicate policy name {policy.name!r} (entries {first} and {index}): "
                "names must be unique"
            )
    return policies


AuthzPolicies = Annotated[list[AuthzPolicyConfig], AfterValidator(_unique_names)]
"""The ``authz:`` list: policies with unique names, evaluated as a set (order only
picks which of several matching policies is reported)."""


def compile_policies(configs: Sequence[AuthzPolicyConfig]) -> tuple[Policy, ...]:
    """Build the runtime policies; every pattern is compiled here, once."""
    _unique_names(list(configs))
    return tuple(_policy(config) for config in configs)


def _policy(config: AuthzPolicyConfig) -> Policy:
    return Policy(
        name=config.name,
        action=config.action,
        rules=tuple(_rule(rule) for rule in config.rules),
        dry_run=config.dry_run,
    )


def _rule(config: RuleConfig) -> Rule:
    return Rule(
        from_=tuple(
            Source(
                principals=tuple(source.principals),
                not_principals=tuple(source.not_principals),
                request_principals=tuple(source.request_principals),
                not_request_principals=tuple(source.not_request_principals),
            )
            for source in config.from_
        ),
        to=tuple(
            Operation(
                methods=tuple(operation.methods),
                not_methods=tuple(operation.not_methods),
                paths=tuple(operation.paths),
                not_paths=tuple(operation.not_paths),
                ports=tuple(operation.ports),
                not_ports=tuple(operation.not_ports),
            )
            for operation in config.to
        ),
        when=tuple(
            Condition(
                key=condition.key,
                values=tuple(condition.values),
                not_values=tuple(condition.not_values),
            )
            for condition in config.when
        ),
    )
