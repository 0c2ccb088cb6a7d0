"""POST /upload: an inpainting source image sent as the raw body.

The body is the image file itself, with `Content-Type: image/png` or
`image/jpeg` (what `fetch(url, {method: "POST", body: file})` sends for a
picked file). The size limit is the route's body limit (413 before reading).
"""

from __future__ import annotations

from typing import Final

from protocol.errors import RequestError
from protocol.imagesize import ImageFormatError, ImageInfo, image_info
from protocol.workflow import MAX_RESOLUTION

UPLOAD_TYPES: Final = ("image/png", "image/jpeg")


def check_upload_type(content_type: str | None) -> str:
    """The declared media type, or a RequestError (415) when it is no upload type."""
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    if declared not in UPLOAD_TYPES:
        raise RequestError(
            f"Content-Type must be {' or '.join(UPLOAD_TYPES)}, not {declared or 'missing'}",
            status_hint=415,
            details={"field": "Content-Type", "allowed": list(UPLOAD_TYPES)},
        )
    return declared


def check_upload(content_type: str | None, body: bytes) -> ImageInfo:
    """The image's format and size, or a RequestError (415 wrong type, 400 bad image)."""
    declared = check_upload_type(content_type)
    if not body:
        raise RequestError("the body is empty; send the image file as the body")
    try:
        info = image_info(body)
    except ImageFormatError as exc:
        raise RequestError(f"the body is not a readable image: {exc}") from None
    if info.content_type != declared:
        raise RequestError(
            f"the body is a {info.format.upper()} image but Content-Type says {declared}",
            details={"field": "Content-Type"},
        )
    if info.width > MAX_RESOLUTION or info.height > MAX_RESOLUTION:
        raise RequestError(
            f"the image is {info.width}x{info.height} pixels; "
            f"each side must be at most {MAX_RESOLUTION}",
            details={"max": MAX_RESOLUTION},
        )
    return info
