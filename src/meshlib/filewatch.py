"""Poll a file for changes from a daemon thread.

Polling (not inotify) because it behaves the same on every filesystem,
including bind mounts and editors that replace files by rename.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("meshlib.filewatch")


class FileWatcher:
    """Calls ``on_change(text)`` whenever the file's content changes."""

    def __init__(
        self, path: str, on_change: Callable[[str], None], interval: float = 0.5, name: str = ""
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._interval = interval
        self._stop = threading.Event()
        self._stat: tuple[int, int, int] | None = None
        self._digest: bytes | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"meshlib-watch-{name or os.path.basename(path)}", daemon=True
        )

    def prime(self, text: str) -> None:
        """Record the content already loaded so it is not reported as a change."""
        self._digest = hashlib.sha256(text.encode()).digest()
        self._stat = self._read_stat()

    def start(self) -> FileWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def check(self) -> bool:
        """Look once; return True when a change was delivered."""
        stat = self._read_stat()
        if stat is None or stat == self._stat:
            return False
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError:
            return False
        self._stat = stat
        digest = hashlib.sha256(text.encode()).digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            self._on_change(text)
        except Exception:  # a broken consumer must not kill the watcher
            log.exception("handling a change of %s failed", self.path)
        return True

    def _read_stat(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()
