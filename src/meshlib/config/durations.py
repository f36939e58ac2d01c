"""Durations in policy files: strings with a unit, such as ``250ms`` or ``2s``."""

from __future__ import annotations

import re

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)\s*$")


def parse_duration(value: object) -> float:
    """Return seconds for a duration string; raise ValueError saying what is accepted."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            f"duration must be a string with a unit, like '250ms' or '2s' (got {value!r})"
        )
    found = _DURATION.match(value)
    if found is None:
        raise ValueError(
            f"bad duration {value!r}: write a number and a unit (us, ms, s, m, h), like '250ms'"
        )
    return float(found.group(1)) * _UNITS[found.group(2)]


def format_duration(seconds: float) -> str:
    """Shortest exact rendering of seconds as a duration string."""
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        count = seconds / scale
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1e3:g}ms"
