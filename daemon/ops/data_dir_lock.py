"""One daemon per data directory.

Two daemons on one data directory would share its journal (SQLite answers
the second with "database is locked", deep in start-up) and its images.
The first takes an exclusive flock on `daemon.lock` there and holds it while
it runs; the second stops at once, naming the directory and the holder's
pid. The kernel drops the lock when its holder exits, however it exits, so a
crashed daemon never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "daemon.lock"


class DataDirInUse(OSError):
    """Another running daemon holds the data directory (the CLI exits 1)."""


class DataDirLock:
    """The held lock; `release()` (or exiting) lets the next daemon in."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"the data directory {directory.resolve()} is in use by another comfy-progress"
                f" (pid {holder}): give each daemon its own data_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
