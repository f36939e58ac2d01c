"""Outlier detection: eject endpoints that fail more than their peers, as Envoy does.

Envoy's detectors and numbers (``envoy.config.cluster.v3.OutlierDetection``):

- consecutive 5xx, consecutive gateway failures (502/503/504) and, when local-origin
  errors are split out, consecutive local-origin failures (connect failures, resets,
  timeouts): eject as the count reaches its threshold, right on the request path;
- success rate: every ``interval``, among hosts with ``success_rate_request_volume``
  requests in the interval (at least ``success_rate_minimum_hosts`` of them), eject
  those below ``mean - stdev_factor / 1000 * stdev`` (population stdev);
- failure percentage: same gathering, eject hosts failing at least
  ``failure_percentage_threshold`` percent of requests;
- an ejection lasts ``base_ejection_time`` times a multiplier that grows by one per
  ejection and shrinks by one per interval the host stays healthy, capped by
  ``max_ejection_time``; ejections never take more than ``max_ejection_percent`` of
  the hosts; each detector ejects only ``enforcing_*`` percent of the time.

Pure: the clock and the RNG are passed in, nothing here does I/O or sleeps. The
request path calls ``record`` and ``tick`` and reads ``ejected()``; ``tick`` is one
comparison until an ejection expires or an interval is due.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger("meshlib.resilience.outlier")

CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
SUCCESS_RATE = "success_rate"
SUCCESS_RATE_LOCAL_ORIGIN = "success_rate_local_origin"
FAILURE_PERCENTAGE = "failure_percentage"
FAILURE_PERCENTAGE_LOCAL_ORIGIN = "failure_percentage_local_origin"

EJECTION_TYPES = (
    CONSECUTIVE_5XX,
    CONSECUTIVE_GATEWAY_FAILURE,
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    SUCCESS_RATE,
    SUCCESS_RATE_LOCAL_ORIGIN,
    FAILURE_PERCENTAGE,
    FAILURE_PERCENTAGE_LOCAL_ORIGIN,
)
"""Ejection reasons, with Envoy's names (``OutlierEjectionType`` in lower case)."""

_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Envoy's outlier detection settings and defaults; durations in seconds.

    Consecutive thresholds of 0 disable that detector. Percentages are 0-100.
    ``success_rate_stdev_factor`` keeps Envoy's unit: thousandths (1900 means 1.9).
    """

    interval: float = 10.0
    base_ejection_time: float = 30.0
    # None: 300 s, or base_ejection_time if that is longer (Envoy's rule when unset).
    max_ejection_time: float | None = None
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: float = 10.0
    # Envoy's default too: with 10% and fewer than 10 hosts nothing is ever ejected
    # unless this is set (or max_ejection_percent raised).
    always_eject_one_host: bool = False
    # Off (Envoy's default): connect failures, resets and timeouts count as 503/504
    # and feed the 5xx and gateway detectors. On: they feed only the local-origin
    # detectors, and a response of any status counts as a local-origin success.
    split_external_local_origin_errors: bool = False
    consecutive_5xx: int = 5
    enforcing_consecutive_5xx: float = 100.0
    consecutive_gateway_failure: int = 5
    # Envoy defaults this to 0 (detect, never eject). Outlier detection is opt-in per
    # service in meshlib, and whoever turns it on expects a host answering 503 to go.
    enforcing_consecutive_gateway_failure: float = 100.0
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_local_origin_failure: float = 100.0
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: float = 1900.0
    enforcing_success_rate: float = 100.0
    enforcing_local_origin_success_rate: float = 100.0
    failure_percentage_threshold: float = 85.0
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    enforcing_failure_percentage: float = 0.0
    enforcing_failure_percentage_local_origin: float = 0.0

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"interval must be > 0 seconds, not {self.interval}")
        if not self.base_ejection_time > 0:
            raise ValueError(
                f"base_ejection_time must be > 0 seconds, not {self.base_ejection_time}"
            )
        if self.max_ejection_time is not None and self.max_ejection_time < self.base_ejection_time:
            raise ValueError(
                f"max_ejection_time ({self.max_ejection_time}) must not be shorter than "
                f"base_ejection_time ({self.base_ejection_time})"
            )
        if self.max_ejection_time_jitter < 0:
            raise ValueError(
                f"max_ejection_time_jitter must be >= 0, not {self.max_ejection_time_jitter}"
            )
        for name in (
            "max_ejection_percent",
            "enforcing_consecutive_5xx",
            "enforcing_consecutive_gateway_failure",
            "enforcing_consecutive_local_origin_failure",
            "enforcing_success_rate",
            "enforcing_local_origin_success_rate",
            "failure_percentage_threshold",
            "enforcing_failure_percentage",
            "enforcing_failure_percentage_local_origin",
        ):
            value = getattr(self, name)
            if not 0 <= value <= 100:
                raise ValueError(f"{name} is a percentage (0-100), not {value}")
        for name in (
            "consecutive_5xx",
            "consecutive_gateway_failure",
            "consecutive_local_origin_failure",
            "success_rate_minimum_hosts",
            "success_rate_request_volume",
            "success_rate_stdev_factor",
            "failure_percentage_minimum_hosts",
            "failure_percentage_request_volume",
        ):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")

    @property
    def effective_max_ejection_time(self) -> float:
        """``max_ejection_time``, or Envoy's default for it when unset."""
        if self.max_ejection_time is None:
            return max(300.0, self.base_ejection_time)
        return self.max_ejection_time


class _Host:
    """Counters and ejection state of one address."""

    __slots__ = (
        "backoff",
        "c5xx",
        "cgw",
        "clocal",
        "ejected_at",
        "ejected_until",
        "ext_ok",
        "ext_total",
        "loc_ok",
        "loc_total",
        "local_success_rate",
        "reason",
        "success_rate",
        "times_ejected",
        "unejected_at",
    )

    def __init__(self) -> None:
        self.c5xx = 0
        self.cgw = 0
        self.clocal = 0
        # the current interval's requests: external origin, local origin
        self.ext_total = 0
        self.ext_ok = 0
        self.loc_total = 0
        self.loc_ok = 0
        self.ejected_until: float | None = None
        self.ejected_at: float | None = None
        self.unejected_at: float | None = None
        self.times_ejected = 0
        self.backoff = 0  # Envoy's ejection time multiplier
        self.reason: str | None = None
        self.success_rate: float | None = None  # from the last analysis, for explain
        self.local_success_rate: float | None = None


def success_rate_threshold(rates: Sequence[float], stdev_factor: float) -> tuple[float, float]:
    """``(mean, ejection threshold)`` of success rates (percent), as Envoy computes them.

    ``stdev_factor`` is in thousandths. When every rate is the same nobody is an
    outlier; the threshold is then that rate, so float noise in the mean cannot put
    identical hosts below it.
    """
    n = len(rates)
    mean = math.fsum(rates) / n
    if max(rates) == min(rates):
        return mean, rates[0]
    stdev = math.sqrt(math.fsum((r - mean) ** 2 for r in rates) / n)
    return mean, mean - stdev_factor / 1000.0 * stdev


class OutlierDetector:
    """Passive health checking of one cluster's hosts, with Envoy's semantics.

    Feed every attempt's outcome to ``record``; call ``tick`` from the request path
    or a timer; route around ``ejected()`` (through ``effective_avoid``). Addresses
    that are not hosts of the cluster (``set_hosts``) are ignored.

    Differences from Envoy, all on the side of precision: a host is returned to service
    at the first ``tick`` after its time is up (Envoy waits for the next interval), and
    a host is never ejected twice at once (Envoy would assert). Analysis runs at the
    first ``tick`` at least ``interval`` after the previous one, over the requests
    since then, so call ``tick`` at least once per interval for Envoy's cadence.

    Counters are bumped without a lock (an increment may rarely be lost under
    threads); ejections and analysis run under a lock.
    """

    __slots__ = (
        "_clock",
        "_ejected",
        "_enforcing",
        "_hosts",
        "_lock",
        "_next_analysis",
        "_next_due",
        "_rng",
        "_split",
        "config",
        "stats",
    )

    def __init__(
        self,
        config: OutlierConfig,
        clock: Callable[[], float],
        rng: random.Random,
        hosts: Iterable[str] = (),
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = rng
        self._split = config.split_external_local_origin_errors
        self._enforcing = {
            CONSECUTIVE_5XX: config.enforcing_consecutive_5xx,
            CONSECUTIVE_GATEWAY_FAILURE: config.enforcing_consecutive_gateway_failure,
            CONSECUTIVE_LOCAL_ORIGIN_FAILURE: config.enforcing_consecutive_local_origin_failure,
            SUCCESS_RATE: config.enforcing_success_rate,
            SUCCESS_RATE_LOCAL_ORIGIN: config.enforcing_local_origin_success_rate,
            FAILURE_PERCENTAGE: config.enforcing_failure_percentage,
            FAILURE_PERCENTAGE_LOCAL_ORIGIN: config.enforcing_failure_percentage_local_origin,
        }
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._ejected = _EMPTY
        self._next_analysis = clock() + config.interval
        self._next_due = self._next_analysis
        self.stats: dict[str, int] = {"overflow": 0}
        for kind in EJECTION_TYPES:
            self.stats[f"detected_{kind}"] = 0
            self.stats[f"enforced_{kind}"] = 0
        self.set_hosts(hosts)

    def ejected(self) -> frozenset[str]:
        """Addresses ejected now (a cached set: no work per call)."""
        return self._ejected

    def set_hosts(self, addresses: Iterable[str]) -> None:
        """The cluster's hosts changed: keep the state of those that stay."""
        with self._lock:
            old = self._hosts
            self._hosts = {a: old[a] if a in old else _Host() for a in addresses}
            self._ejected = frozenset(a for a in self._ejected if a in self._hosts) or _EMPTY
            self._reschedule()

    def record(self, address: str, *, status: int | None, connect_failure: bool = False) -> None:
        """One attempt's outcome: an HTTP status, or None when none came back.

        ``status=None`` is a local-origin failure: a connect failure when
        ``connect_failure``, else a reset or timeout. Without the local-origin split
        these count as 503 and 504 like Envoy's router reports them.
        """
        host = self._hosts.get(address)
        if host is None:
            return
        config = self.config
        if status is None:
            if self._split:
                host.loc_total += 1
                host.clocal += 1
                if host.clocal == config.consecutive_local_origin_failure:
                    self._consecutive(address, host, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)
                return
            status = 503 if connect_failure else 504
        elif self._split:
            # a response came back: the connection worked
            host.loc_total += 1
            host.loc_ok += 1
            host.clocal = 0
        host.ext_total += 1
        if 500 <= status < 600:
            if 502 <= status <= 504:
                host.cgw += 1
                if host.cgw == config.consecutive_gateway_failure:
                    self._consecutive(address, host, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                host.cgw = 0
            host.c5xx += 1
            # == rather than >=: a detection resets the counter (below), and while the
            # host is ejected further failures must not trigger again (Envoy).
            if host.c5xx == config.consecutive_5xx:
                self._consecutive(address, host, CONSECUTIVE_5XX)
        else:
            host.ext_ok += 1
            host.c5xx = 0
            host.cgw = 0

    def tick(self) -> None:
        """Return hosts whose time is up and run the interval analysis when due."""
        now = self._clock()
        if now < self._next_due:
            return
        with self._lock:
            if now < self._next_due:
                return
            for address in [a for a in self._ejected if self._due(a, now)]:
                self._uneject(address, self._hosts[address], now)
            if now >= self._next_analysis:
                self._analyse(now)
                self._next_analysis = now + self.config.interval
            self._reschedule()

    def describe(self) -> dict[str, dict[str, object]]:
        """Per-host counters and ejection state, for explain and config_dump."""
        out: dict[str, dict[str, object]] = {}
        now = self._clock()
        for address, h in list(self._hosts.items()):
            until = h.ejected_until
            view: dict[str, object] = {
                "ejected": until is not None,
                "ejected_until": until,
                "ejected_for": None if until is None else max(0.0, until - now),
                "times_ejected": h.times_ejected,
                "ejection_multiplier": h.backoff,
                "last_ejection_reason": h.reason,
                "consecutive_5xx": h.c5xx,
                "consecutive_gateway_failure": h.cgw,
                "interval_requests": h.ext_total,
                "interval_successes": h.ext_ok,
                "success_rate": h.success_rate,
            }
            if self._split:
                view["consecutive_local_origin_failure"] = h.clocal
                view["interval_local_origin_requests"] = h.loc_total
                view["interval_local_origin_successes"] = h.loc_ok
                view["local_origin_success_rate"] = h.local_success_rate
            out[address] = view
        return out

    def _due(self, address: str, now: float) -> bool:
        until = self._hosts[address].ejected_until
        return until is not None and until <= now

    def _reschedule(self) -> None:
        # Under the lock: the earliest time tick() has anything to do.
        due = self._next_analysis
        for address in self._ejected:
            until = self._hosts[address].ejected_until
            if until is not None and until < due:
                due = until
        self._next_due = due

    def _consecutive(self, address: str, host: _Host, kind: str) -> None:
        with self._lock:
            if self._hosts.get(address) is not host or host.ejected_until is not None:
                return
            self.stats[f"detected_{kind}"] += 1
            self._eject(address, host, kind, self._clock())
            # Reset even when not ejected (over the limit, not enforced), so the next
            # run of failures is detected again without needing a success in between.
            if kind == CONSECUTIVE_5XX:
                host.c5xx = 0
            elif kind == CONSECUTIVE_GATEWAY_FAILURE:
                host.cgw = 0
            else:
                host.clocal = 0

    def _eject(self, address: str, host: _Host, kind: str, now: float) -> None:
        # Under the lock. Envoy's ejectHost: the percentage check, then enforcement.
        config = self.config
        active = len(self._ejected)
        within = (active + 1) * 100 <= config.max_ejection_percent * len(self._hosts)
        if not within and not (config.always_eject_one_host and active == 0):
            self.stats["overflow"] += 1
            return
        enforcing = self._enforcing[kind]
        if enforcing < 100 and not (enforcing > 0 and self._rng.random() * 100 < enforcing):
            return
        jitter = config.max_ejection_time_jitter
        if jitter > 0:
            jitter *= self._rng.random()
        base = config.base_ejection_time
        cap = config.effective_max_ejection_time
        if host.backoff * base < cap + base:
            host.backoff += 1
        duration = min(base * host.backoff, cap) + jitter
        host.times_ejected += 1
        host.ejected_at = now
        host.ejected_until = now + duration
        host.reason = kind
        self._ejected = self._ejected | {address}
        if host.ejected_until < self._next_due:
            self._next_due = host.ejected_until
        self.stats[f"enforced_{kind}"] += 1
        log.info(
            "outlier detection ejected %s for %.3gs (%s, ejection #%d)",
            address,
            duration,
            kind,
            host.times_ejected,
        )

    def _uneject(self, address: str, host: _Host, now: float) -> None:
        host.ejected_until = None
        host.unejected_at = now
        # Counters near their threshold would re-eject on very few new errors (Envoy).
        host.c5xx = host.cgw = host.clocal = 0
        self._ejected = self._ejected - {address} or _EMPTY
        log.info("outlier detection returned %s to service", address)

    def _analyse(self, now: float) -> None:
        external: list[tuple[str, _Host, int, int]] = []
        local: list[tuple[str, _Host, int, int]] = []
        for address, h in self._hosts.items():
            ext_total, ext_ok, loc_total, loc_ok = h.ext_total, h.ext_ok, h.loc_total, h.loc_ok
            h.ext_total = h.ext_ok = h.loc_total = h.loc_ok = 0
            h.success_rate = h.local_success_rate = None
            if h.ejected_until is not None:
                continue  # ejected hosts take no part in the statistics
            if ext_total:
                external.append((address, h, ext_ok, ext_total))
            if loc_total:
                local.append((address, h, loc_ok, loc_total))
        self._statistical(external, SUCCESS_RATE, FAILURE_PERCENTAGE, now)
        if self._split:
            self._statistical(
                local, SUCCESS_RATE_LOCAL_ORIGIN, FAILURE_PERCENTAGE_LOCAL_ORIGIN, now
            )
        # The multiplier shrinks by one per interval a host stays in service.
        interval = self.config.interval
        for h in self._hosts.values():
            if (
                h.backoff
                and h.ejected_until is None
                and h.unejected_at is not None
                and now - h.unejected_at >= interval
            ):
                h.backoff -= 1

    def _statistical(
        self,
        data: list[tuple[str, _Host, int, int]],
        sr_kind: str,
        fp_kind: str,
        now: float,
    ) -> None:
        config = self.config
        local = sr_kind == SUCCESS_RATE_LOCAL_ORIGIN
        sr_volume = config.success_rate_request_volume
        fp_volume = config.failure_percentage_request_volume
        sr_hosts: list[tuple[str, _Host, float]] = []
        fp_hosts: list[tuple[str, _Host, int, int]] = []
        for address, h, ok, total in data:
            rate = ok * 100.0 / total
            if total >= min(sr_volume, fp_volume):
                if local:
                    h.local_success_rate = rate
                else:
                    h.success_rate = rate
            if total >= sr_volume:
                sr_hosts.append((address, h, rate))
            if total >= fp_volume:
                fp_hosts.append((address, h, ok, total))
        if sr_hosts and len(sr_hosts) >= config.success_rate_minimum_hosts:
            _, threshold = success_rate_threshold(
                [rate for _, _, rate in sr_hosts], config.success_rate_stdev_factor
            )
            for address, h, rate in sr_hosts:
                if rate < threshold and h.ejected_until is None:
                    self.stats[f"detected_{sr_kind}"] += 1
                    self._eject(address, h, sr_kind, now)
        if fp_hosts and len(fp_hosts) >= config.failure_percentage_minimum_hosts:
            percent = config.failure_percentage_threshold
            for address, h, ok, total in fp_hosts:
                # (total - ok) / total >= percent / 100, without float rounding at the edge
                if (total - ok) * 100 >= percent * total and h.ejected_until is None:
                    self.stats[f"detected_{fp_kind}"] += 1
                    self._eject(address, h, fp_kind, now)

    def __repr__(self) -> str:
        return f"OutlierDetector({len(self._hosts)} hosts, {len(self._ejected)} ejected)"


def effective_avoid(
    ejected: frozenset[str], total_hosts: int, panic_threshold_percent: float = 50.0
) -> frozenset[str]:
    """The ejected addresses to route around, or none at all in panic.

    When fewer than ``panic_threshold_percent`` of the hosts are healthy, Envoy's load
    balancer panics and uses every host: the detector may be wrong, and piling all
    traffic on the few left would take them down too. 0 disables panic.
    """
    if not ejected or total_hosts <= 0:
        return _EMPTY
    healthy = total_hosts - len(ejected)
    if healthy * 100 < panic_threshold_percent * total_hosts:
        return _EMPTY
    return ejected
