"""Server-side policy of one service: rate limits per route and per caller,
and fault injection. Pure: the ASGI middleware asks, this answers."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from meshlib.resilience.faults import Fault, FaultPolicy, decide_fault
from meshlib.resilience.ratelimit import KeyedLimiter, TokenBucket


@dataclass(frozen=True, slots=True)
class InboundRule:
    """Limits and faults for requests whose path starts with ``path_prefix``."""

    name: str
    path_prefix: str
    bucket: TokenBucket | None = None
    per_caller: KeyedLimiter | None = None
    faults: FaultPolicy | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the server does with a request before the app sees it."""

    rule: str
    limited: bool = False
    retry_after: float = 0.0
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class InboundPolicy:
    """Ordered rules (first matching prefix wins) plus the service-wide rule."""

    service: str
    rules: tuple[InboundRule, ...]
    default: InboundRule
    caller_header: str

    def rule_for(self, path: str) -> InboundRule:
        for rule in self.rules:
            if path.startswith(rule.path_prefix):
                return rule
        return self.default

    def judge(
        self, path: str, caller: str, headers: Mapping[str, str], rng: random.Random
    ) -> Verdict:
        """Rate limits first (a rejected request costs nothing more), then faults."""
        rule = self.rule_for(path)
        for limit in (self.default, rule) if rule is not self.default else (rule,):
            if limit.bucket is not None and not limit.bucket.try_acquire():
                return Verdict(limit.name, limited=True, retry_after=limit.bucket.retry_after())
            keyed = limit.per_caller
            if keyed is not None and not keyed.try_acquire(caller):
                return Verdict(limit.name, limited=True, retry_after=keyed.retry_after(caller))
        faults = rule.faults if rule.faults is not None else self.default.faults
        fault = decide_fault(faults, headers, rng) if faults is not None else None
        return Verdict(rule.name, fault=fault)
