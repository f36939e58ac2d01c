"""Fault injection: decide whether a request gets an injected delay or abort."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """Delay and/or abort a percentage of requests, optionally only those with a header.

    ``header`` is ``(name, value)``: faults apply only to requests whose header ``name``
    is exactly ``value`` (the name is matched case-insensitively, the value is not), so
    a test can inject faults into its own traffic only. Percentages are 0-100.
    """

    delay: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0
    header: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.delay is not None and not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"fault delay must be a number of seconds >= 0, not {self.delay}")
        if self.abort_status is not None and not 200 <= self.abort_status <= 599:
            raise ValueError(f"fault abort status must be 200-599, not {self.abort_status}")
        for name, percent in (
            ("delay_percent", self.delay_percent),
            ("abort_percent", self.abort_percent),
        ):
            if not 0 <= percent <= 100:
                raise ValueError(f"fault {name} must be within 0-100, not {percent}")
        if self.header is not None:
            name, value = self.header
            object.__setattr__(self, "header", (name.lower(), value))


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do to one request: sleep ``delay`` seconds first, then maybe abort."""

    delay: float | None = None
    abort_status: int | None = None


def _fires(percent: float, rng: random.Random) -> bool:
    # Always one draw, so the delay and abort draws stay independent and reproducible.
    return rng.random() * 100.0 < percent


def decide_fault(
    policy: FaultPolicy, headers: Mapping[str, str], rng: random.Random
) -> Fault | None:
    """The fault for one request, or None.

    ``headers`` must look names up case-insensitively (``httpx.Headers`` does) or have
    lowercase keys. The delay and the abort are drawn independently, like Envoy's fault
    filter: a request may get both, the delay first.
    """
    if policy.header is not None:
        name, value = policy.header
        if headers.get(name) != value:
            return None
    delay = policy.delay
    if delay is not None and not _fires(policy.delay_percent, rng):
        delay = None
    status = policy.abort_status
    if status is not None and not _fires(policy.abort_percent, rng):
        status = None
    if delay is None and status is None:
        return None
    return Fault(delay, status)
