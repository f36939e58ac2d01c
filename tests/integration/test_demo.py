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


def test_demo_prints_golden_metrics_and_can_keep_serving_with_the_admin_endpoint() -> None:
    import threading
    import time

    import httpx

    lines: list[str] = []
    stop = threading.Event()
    result: list[int] = []
    runner = threading.Thread(
        target=lambda: result.append(
            run_demo(requests=40, seed=3, out=lines.append, serve=True, until=stop)
        )
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not any(line.startswith("admin endpoint:") for line in lines):
            assert time.monotonic() < deadline and runner.is_alive(), lines[-5:]
            time.sleep(0.05)
        url = next(line for line in lines if line.startswith("admin endpoint:")).split()[2]
        time.sleep(0.3)  # some background traffic
        stats = httpx.get(f"{url}/stats", timeout=5).json()
        assert stats["service"] == "demo-client"
        assert stats["outbound"]["users"]["routes"]["default"]["requests"] >= 40
    finally:
        stop.set()
        runner.join(timeout=30)
    assert result == [0]
    text = "\n".join(lines)
    assert "golden metrics, last minute, client side" in text
    assert "\nusers       default " in text
