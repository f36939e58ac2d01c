"""`meshlib demo` runs on loopback and reports traffic that follows its policy."""

from __future__ import annotations

import pytest

from meshlib.demo.run import run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_and_traffic_follows_the_policy() -> None:
    lines: list[str] = []
    assert run_demo(requests=200, seed=3, out=lines.append) == 0
    text = "\n".join(lines)
    assert "demo OK: traffic followed the policy" in text
    assert "canary-by-header        users_v2      100.0%    100.0%" in text
    assert "callers got {200: 100} (ejected)" in text
