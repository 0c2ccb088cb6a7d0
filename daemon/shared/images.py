"""Images every daemon can serve: written to the local disk and to Redis.

A result image is fetched from ComfyUI by the worker that ran the task, an
inpainting source is uploaded to whichever front took the POST: each is also
SET in Redis with an expiry (`image_retention`, as the local files), so any daemon
serves it, also after the daemon that stored it died. Reads try the local file
first and keep what they fetched from Redis. Limits: Redis holds every image
of the retention window in memory: ~0.5-2 MB per image, so 1,000 images a day
kept for the default week is some GB; lower `image_retention` in shared mode.
Images larger than `max_image_bytes` never get here. For more, a shared
filesystem or an object store would be the next step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import coredis
import trio
from coredis.exceptions import RedisError

from daemon.http.static import StaticFiles
from daemon.http.types import Request, Response, StreamingResponse, unavailable
from daemon.images.store import ImageStore, StorageError
from daemon.shared.store import image_key

log = logging.getLogger(__name__)


class SharedImageStore(ImageStore):
    def __init__(
        self, directory: Path, redis: coredis.Redis[bytes], prefix: str, *, ttl: float
    ) -> None:
        super().__init__(directory)
        self.redis = redis
        self.prefix = prefix
        self.ttl = max(1, int(ttl)) if ttl > 0 else None  # 0: no age limit

    def _key(self, name: str) -> str:
        return image_key(self.prefix, name)

    async def _store(self, name: str, data: bytes) -> None:
        await super()._store(name, data)
        try:
            await self.redis.set(self._key(name), data, ex=self.ttl)
        except RedisError as exc:
            # Redis full (OOM) or gone: no file only this daemon would serve stays.
            await trio.Path(self.directory / name).unlink(missing_ok=True)
            raise StorageError(f"cannot store an image in Redis: {exc}") from exc

    async def read(self, name: str) -> bytes | None:
        data = await super().read(name)
        if data is not None or self.path_of(name) is None:
            return data
        try:
            return await self.redis.get(self._key(name))
        except RedisError as exc:
            # Not "no such image": it may well be there once Redis answers again.
            raise StorageError(f"cannot read the image {name} from Redis: {exc}") from exc

    async def delete(self, name: str) -> None:
        """The local file and Redis' copy (best effort: that one expires anyway)."""
        await super().delete(name)
        if self.path_of(name) is None:
            return
        try:
            await self.redis.delete([self._key(name)])
        except RedisError as exc:
            log.warning("cannot delete image %s from Redis: %s", name, exc)

    async def fetch_to_disk(self, name: str) -> None:
        """Make a served name a local file when only Redis has it (then StaticFiles
        serves it with its usual ETag and caching headers). StorageError when Redis
        does not answer: not "no such image", it may well be there once it does."""
        path = self.path_of(name)
        if path is None or await trio.Path(path).exists():
            return
        key = self._key(name)
        try:
            data = await self.redis.get(key)
            left_ms = await self.redis.pttl(key) if data is not None else -1
        except RedisError as exc:
            raise StorageError(f"cannot read the image {name} from Redis: {exc}") from exc
        if data is not None:
            await trio.to_thread.run_sync(self._write_atomically, name, data)
            if self.ttl is not None and left_ms >= 0:
                # As old as the image (its expiry counts from the save): retention
                # deletes the copy when Redis' goes, not a retention after now.
                saved_at = time.time() - max(0.0, self.ttl - left_ms / 1000)
                with contextlib.suppress(OSError):  # (deleted meanwhile: fetched again)
                    await trio.to_thread.run_sync(os.utime, path, (saved_at, saved_at))


class SharedImageRoute:
    """GET /image/{name} on any daemon: the local file, else Redis' copy."""

    def __init__(self, store: SharedImageStore, files: StaticFiles) -> None:
        self.store = store
        self.files = files

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        try:
            await self.store.fetch_to_disk(request.path_params["name"])
        except StorageError as exc:
            log.warning("%s", exc)
            return unavailable(str(exc))
        return await self.files(request)
