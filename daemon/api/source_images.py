"""Inpainting source images: uploads in, a request's source read back.

POST /upload keeps the image with the generated ones, so `/image/<name>`
serves it and a request names it like any generated image. Nothing goes to
ComfyUI here: the task uploads its source to the backend it is dispatched to
(ComfyUI only has a generated image as an output, LoadImage reads inputs, and
a backend may have lost its input files since).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from daemon.images.store import ImageStore
from protocol.errors import field_error
from protocol.imagesize import ImageFormatError, ImageInfo, image_info
from protocol.task import image_url
from protocol.upload import check_upload


@dataclass(frozen=True, slots=True)
class Source:
    """A stored image, read for a request."""

    name: str
    data: bytes
    info: ImageInfo


class SourceImages:
    def __init__(self, images: ImageStore) -> None:
        self.images = images

    async def accept_upload(self, content_type: str | None, body: bytes) -> dict[str, object]:
        """Check and store an uploaded image; the JSON reply. Raises RequestError."""
        # Off the event loop: reading a header is bounded, but still up to
        # MAX_HEADER_STEPS of Python work on a 20 MiB body.
        info = await trio.to_thread.run_sync(check_upload, content_type, body)
        name = await self.images.save(body)
        return {
            "imageUrl": image_url(name),
            "width": info.width,
            "height": info.height,
            "contentType": info.content_type,
        }

    async def read(self, name: str, *, field: str) -> Source:
        """A stored image named by a request's `field`; a RequestError when there is none.

        Retention keeps it from before the read until `release(name)`: the caller
        releases it once its task holds it (or it made none)."""
        self.images.hold(name)
        try:
            data = await self.images.read(name)
            if data is None:
                raise field_error(field, f"there is no image {image_url(name)} on this daemon")
            try:
                info = await trio.to_thread.run_sync(image_info, data)
            except ImageFormatError as exc:
                raise field_error(field, f"{image_url(name)} cannot be a source: {exc}") from None
        except BaseException:
            self.images.release(name)
            raise
        return Source(name, data, info)

    def release(self, name: str) -> None:
        """A `read` source is held by its task now, or will never be."""
        self.images.release(name)
