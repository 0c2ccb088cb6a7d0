"""Image retention: the image store does not grow forever.

Every `interval` seconds (and soon after a save while a size budget is set)
the janitor deletes, oldest first by modification time:

1. images older than `retention` seconds (0: no age limit);
2. then more images, oldest first, while the store is above `max_bytes`
   (0: no size limit).

It never deletes an image a live task needs: the source image of a task the
registry still holds, or its result while the task is retained (`in_use`),
nor one being saved, nor a source a POST /generate is reading (`reading`:
from before its read until its task is held). The listing of those is taken
after the folder is read: an image saved meanwhile is either not in the
folder's reading or already in the listing, never in the first only (it
would look unused and be the first to go over the size budget, being the
newest).
Half-written files (`.name.partial`) left by a crash go after an hour.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from daemon.images.store import ImageStore, is_valid_name

log = logging.getLogger(__name__)

PARTIAL_MAX_AGE: Final = 3600.0
MIN_SWEEP_GAP: Final = 1.0  # seconds between sweeps triggered by saves


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    retention: float  # seconds; 0: keep regardless of age
    max_bytes: int  # 0: no budget
    interval: float = 60.0


@dataclass(frozen=True, slots=True)
class _File:
    name: str
    size: int
    mtime: float


class ImageJanitor:
    def __init__(
        self,
        store: ImageStore,
        policy: RetentionPolicy,
        *,
        in_use: Callable[[], Set[str]],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy
        self.in_use = in_use
        self.wall_clock = wall_clock
        self.deleted = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.sweep()
            with trio.move_on_after(self.policy.interval):
                if self.policy.max_bytes:
                    await trio.sleep(MIN_SWEEP_GAP)
                    await self.store.saved.wait()
                else:
                    await trio.sleep_forever()

    async def sweep(self) -> list[str]:
        """One pass; the names deleted."""
        now = self.wall_clock()
        try:
            deleted = await trio.to_thread.run_sync(self._sweep_sync, now)
        except OSError as exc:
            log.warning("image retention: cannot sweep %s: %s", self.store.directory, exc)
            return []
        if deleted:
            self.deleted += len(deleted)
            log.info("image retention: deleted %d image(s)", len(deleted))
        return deleted

    def _in_use_now(self) -> frozenset[str]:
        return frozenset(self.in_use()) | self.store.saving | self.store.reading.keys()

    def _sweep_sync(self, now: float) -> list[str]:
        directory = self.store.directory
        files: list[_File] = []
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.endswith(".partial") and now - info.st_mtime > PARTIAL_MAX_AGE:
                    _unlink(directory / entry.name)
                elif is_valid_name(entry.name) and entry.is_file(follow_symlinks=False):
                    files.append(_File(entry.name, info.st_size, info.st_mtime))
        files.sort(key=lambda f: f.mtime)
        # After the reading, on the loop (where tasks change): see the module's doc.
        keep = trio.from_thread.run_sync(self._in_use_now)
        policy = self.policy
        total = sum(f.size for f in files)
        deleted: list[str] = []
        for file in files:
            if file.name in keep:
                continue
            too_old = policy.retention > 0 and now - file.mtime > policy.retention
            over_budget = policy.max_bytes > 0 and total > policy.max_bytes
            if not (too_old or over_budget):
                continue
            _unlink(directory / file.name)
            total -= file.size
            deleted.append(file.name)
        return deleted


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("image retention: cannot delete %s: %s", path, exc)
