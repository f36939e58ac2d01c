"""Hot reload under live traffic: good edits change routing without a failed
request; broken edits are rejected with file, line and field path while the last
good snapshot keeps serving; the next good edit clears the error.

Each policy generation stamps ``x-policy: <generation>`` on the requests it
routes, so every reply says which snapshot carried it.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from integration.support import (
    CLIENT_TIMEOUT,
    StartEcho,
    Upstream,
    line_of,
    wait_until,
    write_atomic,
)
from meshlib import ConfigError, Mesh

pytestmark = pytest.mark.integration

WORKERS = 3
PER_WORKER_LIMIT = 3000
PHASE_REQUESTS = 20


def policy_text(a: Upstream, b: Upstream, generation: str, weight_a: int, weight_b: int) -> str:
    return f"""\
services:
  users:
    endpoints:
      - {{address: "{a.address}", labels: {{v: a}}}}
      - {{address: "{b.address}", labels: {{v: b}}}}
    subsets:
      a: {{v: a}}
      b: {{v: b}}
    routes:
      - name: split
        match: {{path: {{prefix: /}}}}
        request_headers: {{set: {{x-policy: "{generation}"}}}}
        to: [{{subset: a, weight: {weight_a}}}, {{subset: b, weight: {weight_b}}}]
"""


@dataclass(frozen=True)
class Outcome:
    worker: int
    phase: str
    policy: str | None  # the generation that routed it
    server: str | None
    error: str | None


class Traffic:
    """WORKERS callers sending GET http://users/ until stopped (bounded per caller),
    through ``mesh.http_client()`` on threads or ``mesh.async_http_client()`` tasks
    under ``asyncio.run`` on one thread."""

    def __init__(self, mesh: Mesh, kind: str) -> None:
        self.mesh = mesh
        self.kind = kind
        self.phase = "start"
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _record(self, worker: int, phase: str, response: httpx.Response | BaseException) -> None:
        if isinstance(response, BaseException):
            outcome = Outcome(worker, phase, None, None, repr(response))
        elif response.status_code != 200:
            outcome = Outcome(worker, phase, None, None, f"status {response.status_code}")
        else:
            seen = response.json()["headers"]
            outcome = Outcome(
                worker, phase, seen.get("x-policy"), response.headers["x-server"], None
            )
        with self._lock:
            self.outcomes.append(outcome)

    def _sync_worker(self, worker: int) -> None:
        with self.mesh.http_client(timeout=CLIENT_TIMEOUT) as client:
            for _ in range(PER_WORKER_LIMIT):
                if self._stop.is_set():
                    return
                phase = self.phase
                try:
                    response: httpx.Response | BaseException = client.get("http://users/")
                except Exception as exc:
                    response = exc
                self._record(worker, phase, response)
                time.sleep(0.001)

    async def _async_main(self) -> None:
        async with self.mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:

            async def worker(index: int) -> None:
                for _ in range(PER_WORKER_LIMIT):
                    if self._stop.is_set():
                        return
                    phase = self.phase
                    try:
                        response: httpx.Response | BaseException = await client.get("http://users/")
                    except Exception as exc:
                        response = exc
                    self._record(index, phase, response)
                    await asyncio.sleep(0.001)

            await asyncio.gather(*(worker(i) for i in range(WORKERS)))

    def start(self) -> Traffic:
        if self.kind == "sync":
            self._threads = [
                threading.Thread(target=self._sync_worker, args=(i,)) for i in range(WORKERS)
            ]
        else:
            self._threads = [threading.Thread(target=asyncio.run, args=(self._async_main(),))]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CLIENT_TIMEOUT)

    def in_phase(self, phase: str) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.phase == phase]

    def enter(self, phase: str, expect_policy: str) -> None:
        """Tag new requests with ``phase``; wait until enough of them were served
        by the policy generation ``expect_policy``."""
        self.phase = phase
        wait_until(
            lambda: sum(o.policy == expect_policy for o in self.in_phase(phase)) >= PHASE_REQUESTS,
            f"{PHASE_REQUESTS} requests in phase {phase}",
        )


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_hot_reload_under_traffic(echo: StartEcho, tmp_path: Path, kind: str) -> None:
    a, b = echo("a", "b")
    path = tmp_path / "mesh.yaml"
    path.write_text(policy_text(a, b, "gen-1", 100, 0))
    expected_server = {"gen-1": "a", "gen-2": "b", "gen-3": "a"}

    mesh = Mesh.from_file(path, poll_interval=0.05, rng=random.Random(1))
    traffic = Traffic(mesh, kind).start()
    try:
        traffic.enter("gen-1", "gen-1")
        assert mesh.snapshot.source == str(path)

        # a good edit: the split flips from 100/0 to 0/100
        traffic.phase = "switching-1"
        before = mesh.snapshot.version
        write_atomic(path, policy_text(a, b, "gen-2", 0, 100))
        wait_until(lambda: mesh.snapshot.version > before, "the good edit to apply")
        good_version = mesh.snapshot.version
        traffic.enter("gen-2", "gen-2")

        # a broken edit: an unknown key
        traffic.phase = "breaking-1"
        text = policy_text(a, b, "broken-1", 100, 0).replace(
            "        to:", "        timeoutt: 2s\n        to:"
        )
        write_atomic(path, text)
        wait_until(lambda: mesh.last_error is not None, "the unknown key to be rejected")
        assert_rejected(
            mesh, path, line_of(text, "timeoutt"), "services.users.routes[0].timeoutt", "timeoutt"
        )
        assert mesh.snapshot.version == good_version
        traffic.enter("broken-1", "gen-2")

        # another broken edit: a bad regex
        traffic.phase = "breaking-2"
        text = policy_text(a, b, "broken-2", 100, 0).replace(
            "match: {path: {prefix: /}}", 'match: {headers: {x-id: {regex: "(unclosed"}}}'
        )
        write_atomic(path, text)
        wait_until(
            lambda: (
                mesh.last_error is not None and mesh.last_error.issues[0].path.endswith(".regex")
            ),
            "the bad regex to be rejected",
        )
        assert_rejected(
            mesh,
            path,
            line_of(text, "(unclosed"),
            "services.users.routes[0].match.headers.x-id.regex",
            "invalid regex",
        )
        assert mesh.snapshot.version == good_version
        traffic.enter("broken-2", "gen-2")

        # a good edit clears the error and changes routing again
        traffic.phase = "switching-2"
        write_atomic(path, policy_text(a, b, "gen-3", 100, 0))
        wait_until(lambda: mesh.snapshot.version > good_version, "the fixed policy to apply")
        assert mesh.last_error is None
        assert mesh.config_dump()["last_error"] is None
        traffic.enter("gen-3", "gen-3")
    finally:
        traffic.stop()
        mesh.close()

    outcomes = traffic.outcomes
    assert [o for o in outcomes if o.error is not None] == []
    # every reply went where the snapshot that routed it said, and broken edits
    # never routed anything
    assert {o.policy for o in outcomes} == {"gen-1", "gen-2", "gen-3"}
    assert all(o.server == expected_server[o.policy or ""] for o in outcomes)
    # a caller's requests never go back to an older snapshot
    order = {"gen-1": 1, "gen-2": 2, "gen-3": 3}
    for worker in {o.worker for o in outcomes}:
        generations = [order[o.policy or ""] for o in outcomes if o.worker == worker]
        assert generations == sorted(generations)
    # while the broken edits were on disk, the last good snapshot served everything
    for phase in ("broken-1", "broken-2"):
        assert {o.policy for o in traffic.in_phase(phase)} <= {"gen-2", "gen-3"}
        assert sum(o.policy == "gen-2" for o in traffic.in_phase(phase)) >= PHASE_REQUESTS


def assert_rejected(mesh: Mesh, path: Path, line: int, field: str, words: str) -> None:
    error = mesh.last_error
    assert isinstance(error, ConfigError)
    issue = error.issues[0]
    assert (issue.file, issue.line, issue.path) == (str(path), line, field)
    assert words in issue.message
    assert f"{path}:{line}: {field}:" in str(error)

    dump = mesh.config_dump()
    json.dumps(dump)
    recorded = dump["last_error"]
    assert recorded is not None
    assert recorded["issues"][0]["file"] == str(path)
    assert recorded["issues"][0]["line"] == line
    assert recorded["issues"][0]["path"] == field
    assert f"{path}:{line}: {field}:" in recorded["message"]
    assert isinstance(recorded["at"], float)
    assert dump["version"] == mesh.snapshot.version
    assert dump["source"] == str(path)
