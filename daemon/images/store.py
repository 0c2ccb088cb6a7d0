"""The image store: finished images on disk, served at /image/{name}.

Names are random (128 bits) rather than derived from the task id, so an image
URL that gets shared does not hand out the task's id. Files are written to a
temporary name and renamed, so a crash never leaves half an image under a
served name.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import trio

from daemon.signals import Signal

_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(png|jpg|webp)$")
_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"RIFF", "webp"),
)


class StorageError(Exception):
    """The image directory cannot take the file (missing, not a directory, full, read-only)."""


class NotAnImage(Exception):
    """The bytes are not a PNG, JPEG or WebP image."""


def image_suffix(data: bytes) -> str:
    """The file suffix for an image's bytes, from its magic number."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic) and (suffix != "webp" or data[8:12] == b"WEBP"):
            return suffix
    raise NotAnImage("not a PNG, JPEG or WebP image")


def is_valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


_NO_NAMES: frozenset[str] = frozenset()  # shared: most graphs read no image of ours


def image_names_in(graph: Mapping[str, Any]) -> frozenset[str]:
    """Names of our images a ComfyUI graph refers to (a LoadImage source, by its input)."""
    names = set()
    for node in graph.values():
        # dict first: an isinstance check against the Mapping ABC is several times slower.
        inputs = node.get("inputs") if isinstance(node, dict | Mapping) else None
        if isinstance(inputs, dict | Mapping):
            for value in inputs.values():
                if isinstance(value, str) and is_valid_name(value.rsplit("/", 1)[-1]):
                    names.add(value.rsplit("/", 1)[-1])
    return frozenset(names) if names else _NO_NAMES


class ImageStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved = Signal()  # fires after every save (the retention janitor listens)
        # Names being saved: retention keeps them (their caller holds them as soon as
        # save() returns, with no checkpoint between).
        self.saving: set[str] = set()
        # Names a request holds while it reads them and until its task holds them
        # (a source image: a POST /generate awaits between its read and its task).
        self.reading: dict[str, int] = {}

    def hold(self, name: str) -> None:
        """Retention keeps `name` until as many `release` calls."""
        self.reading[name] = self.reading.get(name, 0) + 1

    def release(self, name: str) -> None:
        left = self.reading.pop(name) - 1
        if left:
            self.reading[name] = left

    async def open(self) -> None:
        await trio.Path(self.directory).mkdir(parents=True, exist_ok=True)

    async def save(self, data: bytes) -> str:
        """Store one image; returns its new file name."""
        name = f"{secrets.token_urlsafe(16)}.{image_suffix(data)}"
        self.saving.add(name)
        try:
            await self._store(name, data)
        finally:
            self.saving.discard(name)
        self.saved.fire()
        return name

    async def _store(self, name: str, data: bytes) -> None:
        try:
            await trio.to_thread.run_sync(self._write_atomically, name, data)
        except OSError as exc:
            raise StorageError(
                f"cannot store an image in {self.directory}: {exc.strerror or exc}"
            ) from exc

    def _write_atomically(self, name: str, data: bytes) -> None:
        final = self.directory / name
        temporary = self.directory / f".{name}.partial"
        try:
            with temporary.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            temporary.replace(final)
        except OSError:
            temporary.unlink(missing_ok=True)  # a full disk leaves no half file behind
            raise

    def path_of(self, name: str) -> Path | None:
        """The file for a served name, or None for names we never hand out."""
        if not is_valid_name(name):
            return None
        return self.directory / name

    async def read(self, name: str) -> bytes | None:
        """The image's bytes; None when there is no such image (StorageError when it
        cannot be read now)."""
        path = self.path_of(name)
        if path is None:
            return None
        try:
            return await trio.Path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc

    async def delete(self, name: str) -> None:
        """Remove a stored image (gone already is fine)."""
        path = self.path_of(name)
        if path is not None:
            await trio.Path(path).unlink(missing_ok=True)
