"""Response bodies that count the bytes the application reads, for the body size
histograms, and keep the first ones for a tap that asked for bodies: the mesh's
transports wrap every answer in one (it also gives the endpoint's in-flight slot back
when closed), and the call's telemetry says where the count and the kept bytes go
when the body is closed."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("meshlib.http")

SizeRecorder = Callable[[float], None]


class Capture:
    """The first ``cap`` bytes of a body; a mesh response body hands them to
    ``done`` when it is closed."""

    __slots__ = ("cap", "data", "done")

    def __init__(self, cap: int, done: Callable[[bytes], None] | None = None) -> None:
        self.cap = cap
        self.data = b""
        self.done = done

    def keep(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]


class CountedBody:
    """The part of a mesh response body that counts what was read."""

    received = 0
    on_close: SizeRecorder | None = None
    """Gets the byte count once, when the body is closed (set by telemetry)."""
    capture: Capture | None = None
    """Keeps the first bytes read for a tap (set by telemetry)."""

    def _read(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.capture is not None:
            self.capture.keep(chunk)

    def _closed(self) -> None:
        recorder, capture = self.on_close, self.capture
        self.on_close = self.capture = None
        try:
            if recorder is not None:
                recorder(self.received)
            if capture is not None and capture.done is not None:
                capture.done(capture.data)
        except Exception:  # telemetry must never break closing the application's response
            log.exception("recording a response body's size or tap event failed")
