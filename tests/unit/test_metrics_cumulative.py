"""Observable counters stay cumulative when a policy change replaces the budget or
outlier detector that counts (the new object starts from zero)."""

from __future__ import annotations

from meshlib.telemetry.metrics import METRICS


def test_values_of_replaced_owners_are_carried_over() -> None:
    first, second, third = object(), object(), object()
    key = ("test", "checkout", "users", "default")
    assert METRICS._cumulative(key, [first], 3) == 3
    assert METRICS._cumulative(key, [first], 5) == 5
    assert METRICS._cumulative(key, [second], 0) == 5  # replaced: never goes down
    assert METRICS._cumulative(key, [second], 2) == 7
    assert METRICS._cumulative(key, [second, third], 1) == 8  # a hedge budget appeared
    other = ("test", "checkout", "billing", "default")
    assert METRICS._cumulative(other, [first], 4) == 4  # keys are independent
