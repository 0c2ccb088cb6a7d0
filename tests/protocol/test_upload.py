"""protocol.upload: what POST /upload accepts."""

from __future__ import annotations

import pytest

from protocol.errors import RequestError
from protocol.imagesize import ImageInfo
from protocol.upload import check_upload
from tests.protocol.images import jpeg, png


@pytest.mark.parametrize(
    ("content_type", "body", "info"),
    [
        ("image/png", png(96, 64), ImageInfo("png", 96, 64)),
        ("IMAGE/PNG; charset=binary", png(96, 64), ImageInfo("png", 96, 64)),
        ("image/jpeg", jpeg(640, 480), ImageInfo("jpeg", 640, 480)),
        ("image/png", png(16384, 1), ImageInfo("png", 16384, 1)),
    ],
)
def test_accepted(content_type: str, body: bytes, info: ImageInfo) -> None:
    assert check_upload(content_type, body) == info


@pytest.mark.parametrize(
    ("content_type", "body", "status", "message"),
    [
        (None, png(8, 8), 415, "Content-Type must be image/png or image/jpeg, not missing"),
        (
            "image/webp",
            png(8, 8),
            415,
            "Content-Type must be image/png or image/jpeg, not image/webp",
        ),
        ("multipart/form-data; boundary=x", png(8, 8), 415, "not multipart/form-data"),
        ("image/png", b"", 400, "the body is empty; send the image file as the body"),
        ("image/png", b"hello", 400, "the body is not a readable image: not a PNG or JPEG image"),
        ("image/png", jpeg(8, 8), 400, "the body is a JPEG image but Content-Type says image/png"),
        ("image/jpeg", png(8, 8), 400, "the body is a PNG image but Content-Type says image/jpeg"),
        (
            "image/png",
            png(16385, 8),
            400,
            "the image is 16385x8 pixels; each side must be at most 16384",
        ),
    ],
)
def test_refused(content_type: str | None, body: bytes, status: int, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_upload(content_type, body)
    assert caught.value.status_hint == status
    assert message in caught.value.message
