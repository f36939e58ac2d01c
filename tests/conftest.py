"""Suite-wide rules: no tests is a failure, and in CI a skip is a failure."""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    no_tests = exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED
    if no_tests or (os.environ.get("CI") and _skipped):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if os.environ.get("CI") and _skipped:
        terminalreporter.write_line(
            f"CI: {len(_skipped)} skipped test(s) count as failures: {', '.join(_skipped)}",
            red=True,
        )
