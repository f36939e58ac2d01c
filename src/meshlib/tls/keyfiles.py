"""Key and certificate files with safe permissions.

Private keys are created 0600 from the first byte (never written and then chmod-ed,
which would leave a window where others can read them) and are refused on read when
group or others can access them, like ssh does.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

StrPath = str | os.PathLike[str]

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def _write_new(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it (remove it or write elsewhere)"
        ) from None
    try:
        # the umask may have removed bits from ``mode``; the file must have exactly it
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=True) as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _replace(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file 0600, so a private key is never readable by others,
    # and os.replace makes readers see either the old or the new content, never a mix
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=True) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


def _write(path: StrPath, data: bytes, mode: int, overwrite: bool) -> Path:
    target = Path(path)
    if overwrite:
        _replace(target, data, mode)
    else:
        _write_new(target, data, mode)
    return target


def write_private(path: StrPath, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a private key file with mode 0600.

    Raises FileExistsError if the file exists, unless ``overwrite`` is true, in which
    case it is replaced atomically.
    """
    return _write(path, data, PRIVATE_MODE, overwrite)


def write_public(path: StrPath, data: bytes, overwrite: bool = False) -> Path:
    """Write a certificate or bundle file with mode 0644 (same rules as write_private)."""
    return _write(path, data, PUBLIC_MODE, overwrite)


def read_private(path: StrPath) -> bytes:
    """Read a private key file, refusing one that group or others can read or write."""
    target = Path(path)
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", closefd=True) as handle:
        # check the opened file, not the path, so a swap between check and read cannot pass
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"{target} is not a regular file; refusing to read it as a key")
        if info.st_mode & 0o077:
            raise PermissionError(
                f"private key {target} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {target}"
            )
        return handle.read()
