"""Mesh response bodies count what the application reads, keep the first bytes for
a tap, and report both once, when closed; telemetry failures never reach the
application."""

from __future__ import annotations

import httpx
import pytest

from meshlib.endpoint import Endpoint
from meshlib.http.counted import Capture
from meshlib.http.sync_transport import _EndpointStream


def _body(chunks: list[bytes]) -> _EndpointStream:
    endpoint = Endpoint("127.0.0.1", 9)
    endpoint.load.inflight += 1
    return _EndpointStream(iter(chunks), endpoint)


def test_counts_keeps_and_reports_once_when_closed() -> None:
    sizes: list[float] = []
    kept: list[bytes] = []
    body = _body([b"hello ", b"mesh ", b"world"])
    body.on_close = sizes.append
    body.capture = Capture(8, kept.append)
    assert b"".join(body) == b"hello mesh world"
    assert (sizes, kept) == ([], [])  # nothing before the close
    body.close()
    body.close()
    assert (sizes, kept) == ([16], [b"hello me"])


def test_a_body_closed_unread_reports_what_was_read() -> None:
    sizes: list[float] = []
    body = _body([b"never read"])
    body.on_close = sizes.append
    body.close()
    assert sizes == [0]


def test_a_failing_recorder_never_breaks_closing_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(value: float) -> None:
        raise RuntimeError("exporter bug")

    body = _body([b"x"])
    body.on_close = broken
    response = httpx.Response(200, stream=body)
    response.read()
    response.close()  # no exception
    assert "recording a response body's size or tap event failed" in caplog.text
