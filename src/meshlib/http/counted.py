"""Response bodies that count the bytes the application reads, for the body size
histograms: the mesh's transports wrap every answer in one (it also gives the
endpoint's in-flight slot back when closed), and the call's telemetry says where the
count goes when the body is closed."""

from __future__ import annotations

from collections.abc import Callable

SizeRecorder = Callable[[float], None]


class CountedBody:
    """The part of a mesh response body that counts what was read."""

    received = 0
    on_close: SizeRecorder | None = None
    """Gets the byte count once, when the body is closed (set by telemetry)."""

    def _closed(self) -> None:
        recorder = self.on_close
        if recorder is not None:
            self.on_close = None
            recorder(self.received)
