"""Static files from one directory, safely: a Handler for a ``{path...}`` route.

Usage::

    router.add("GET", "/{path...}", StaticFiles(public_dir))
    router.add("GET", "/image/{name}", StaticFiles(images_dir, param="name"))

Rules: the requested path must stay inside the root once symlinks are resolved;
``..``, ``.``-files, empty segments, backslashes and absolute paths are 404, NUL
is 400; a directory serves its ``index.html``. Responses carry Content-Type,
ETag, Last-Modified and Cache-Control and honour If-None-Match (then
If-Modified-Since) with 304. Files are read in a worker thread, up to
``max_file_bytes``; those above STREAM_ABOVE_BYTES are streamed in slices
rather than held in memory (many slow readers of a large image cost a slice
each, not the file each).
"""

from __future__ import annotations

import logging
import mimetypes
import os
import stat
import time
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO

import trio

from daemon.http.limits import MiB
from daemon.http.types import BodyWriter, Request, Response, StreamingResponse, error_response

logger = logging.getLogger(__name__)

# Pinned here so the answer does not depend on the host's /etc/mime.types.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
}
_DEFAULT_CONTENT_TYPE = "application/octet-stream"
# Files above this size are streamed from disk, SLICE_BYTES at a time.
STREAM_ABOVE_BYTES = 256 * 1024
SLICE_BYTES = 64 * 1024


def content_type_for(name: str) -> str:
    """The Content-Type for a file name, from its suffix."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or _DEFAULT_CONTENT_TYPE


def safe_parts(relative: str) -> list[str] | None:
    """The path segments of `relative` if it is a harmless relative path, else None.

    A trailing ``/`` is allowed (a directory). NUL must be rejected by the caller.
    """
    if relative == "":
        return []
    parts = relative.split("/")
    if parts[-1] == "":
        parts.pop()
    for part in parts:
        if not part or part.startswith(".") or "\\" in part:
            return None
    return parts


@dataclass(frozen=True)
class _Conditions:
    """The request's cache validators."""

    if_none_match: str | None
    if_modified_since: str | None

    def not_modified(self, etag: str, mtime: float) -> bool:
        if self.if_none_match is not None:
            tags = {tag.strip().removeprefix("W/") for tag in self.if_none_match.split(",")}
            return "*" in tags or etag in tags
        if self.if_modified_since is not None:
            try:
                since = parsedate_to_datetime(self.if_modified_since).timestamp()
            except (TypeError, ValueError, OverflowError):
                # Unreadable (a zone offset beyond a C int overflows): ignored, as RFC 9110 says.
                return False
            if since > time.time():
                # A date in the future is no validator we sent: ignored (RFC 2616
                # 14.25 calls it invalid), so a skewed client clock cannot pin a 304.
                return False
            return int(mtime) <= since
        return False


@dataclass(frozen=True)
class _Found:
    content_type: str
    etag: str
    mtime: float
    body: bytes | None  # None when not modified, or when the file is streamed
    path: Path | None = None  # a large file, streamed from disk in slices
    size: int = 0
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino): the file we checked


class _TooLarge(Exception):
    pass


class StaticFiles:
    """A Handler serving files below `root` (read-only, GET/HEAD)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        param: str = "path",
        cache_control: str | None = "no-cache",
        index: str = "index.html",
        max_file_bytes: int = 16 * MiB,
    ) -> None:
        """Serve `root`; the relative path comes from the route parameter `param`.

        `cache_control` is sent as is (None: no header). ``"no-cache"`` makes
        browsers revalidate every time, which ETag makes cheap.
        """
        self._root = Path(root)
        self._param = param
        self._cache_control = cache_control
        self._index = index
        self._max_file_bytes = max_file_bytes

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        """Answer with the file, 304, or a JSON 400/404/405."""
        if request.method not in ("GET", "HEAD"):
            await trio.lowlevel.checkpoint()
            return error_response(405, "method not allowed")
        relative = request.path_params.get(self._param, "")
        if "\x00" in relative:
            await trio.lowlevel.checkpoint()
            return error_response(400, "invalid path")
        parts = safe_parts(relative)
        if parts is None:
            await trio.lowlevel.checkpoint()
            return error_response(404, "not found", {"path": request.path})
        conditions = _Conditions(
            request.headers.get("if-none-match"), request.headers.get("if-modified-since")
        )
        try:
            found = await trio.to_thread.run_sync(self._load, parts, conditions)
        except _TooLarge:
            logger.error(
                "refusing to serve %s: larger than %d bytes", request.path, self._max_file_bytes
            )
            return error_response(500, "file too large to serve")
        if found is None:
            return error_response(404, "not found", {"path": request.path})
        headers = [
            ("etag", found.etag),
            ("last-modified", formatdate(found.mtime, usegmt=True)),
        ]
        if self._cache_control is not None:
            headers.append(("cache-control", self._cache_control))
        if found.body is None and found.path is None:
            return Response(304, headers)
        headers += [
            ("content-type", found.content_type),
            ("x-content-type-options", "nosniff"),
        ]
        if found.path is not None:
            return StreamingResponse(
                200, headers, partial(_stream_file, found), content_length=found.size
            )
        return Response(200, headers, found.body or b"")

    def _load(self, parts: list[str], conditions: _Conditions) -> _Found | None:
        """Find, check and read the file (runs in a worker thread)."""
        root = self._root.resolve()
        try:
            path = root.joinpath(*parts).resolve(strict=True)
            if not path.is_relative_to(root):
                return None  # a symlink pointing outside the root
            if path.is_dir():
                path = (path / self._index).resolve(strict=True)
                if not path.is_relative_to(root):
                    return None
            # O_NONBLOCK: opening a FIFO must not hang the worker thread.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except (OSError, RuntimeError):
            return None  # missing, unreadable, or a symlink loop
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None
            etag = f'"{info.st_size:x}-{info.st_mtime_ns:x}"'
            if conditions.not_modified(etag, info.st_mtime):
                return _Found(content_type_for(path.name), etag, info.st_mtime, None)
            if info.st_size > self._max_file_bytes:
                raise _TooLarge
            content_type = content_type_for(path.name)
            if info.st_size > STREAM_ABOVE_BYTES:
                # Large files are not held in memory: the response reads them in slices.
                return _Found(
                    content_type,
                    etag,
                    info.st_mtime,
                    None,
                    path=path,
                    size=info.st_size,
                    identity=(info.st_dev, info.st_ino),
                )
            body = file.read(info.st_size)
        # mimetypes may read the host's tables on first use: keep it off the loop too.
        return _Found(content_type, etag, info.st_mtime, body)


async def _stream_file(found: _Found, writer: BodyWriter) -> None:
    """Write a checked file in SLICE_BYTES slices, each read in a worker thread.

    The file is opened here, not when it was checked, so a response that is
    never streamed (HEAD, a client gone) holds no descriptor. A file replaced
    or shortened in between ends the response early (the client sees a short
    body and a closed connection), never with other bytes.
    """
    assert found.path is not None
    file = await trio.to_thread.run_sync(_open_same_file, found)
    try:
        left = found.size
        while left > 0:
            data = await trio.to_thread.run_sync(file.read, min(SLICE_BYTES, left))
            if not data:
                raise OSError(f"{found.path} became shorter while it was sent")
            left -= len(data)
            await writer.send(data)
    finally:
        file.close()


def _open_same_file(found: _Found) -> BinaryIO:
    assert found.path is not None
    file = open(found.path, "rb")  # noqa: SIM115 - closed by _stream_file
    info = os.fstat(file.fileno())
    if (info.st_dev, info.st_ino) != found.identity:
        file.close()
        raise OSError(f"{found.path} was replaced while it was sent")
    return file
