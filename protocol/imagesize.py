"""The pixel size of a PNG or JPEG, read from its header, as ComfyUI's LoadImage sees it.

LoadImage applies the EXIF orientation (PIL `ImageOps.exif_transpose`), so a
photo stored 4000x3000 with orientation 6 ("rotate 90") is 3000x4000 to
ComfyUI. We swap the sides the same way, or an inpaint area would be checked
against the wrong width and height. Malformed EXIF counts as "no rotation",
as PIL also carries on without it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
JPEG_SOI: Final = b"\xff\xd8"
_ORIENTATION_TAG: Final = 0x0112
_TIFF_SHORT: Final = 3
# Orientations 5-8 turn the picture by 90 degrees: width and height trade places.
_SWAPS_SIDES: Final = frozenset({5, 6, 7, 8})
# SOF0-SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS: Final = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS: Final = 0xDA
_EOI: Final = 0xD9
_APP1: Final = 0xE1


class ImageFormatError(ValueError):
    """The bytes are not a PNG or JPEG we can read the size of; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str  # "png" | "jpeg"
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


def image_info(data: bytes) -> ImageInfo:
    """Format and pixel size (after the EXIF orientation) of a whole PNG or JPEG file."""
    if data.startswith(PNG_SIGNATURE):
        return _png(data)
    if data.startswith(JPEG_SOI):
        return _jpeg(data)
    raise ImageFormatError("not a PNG or JPEG image")


def _oriented(fmt: str, width: int, height: int, orientation: int) -> ImageInfo:
    if width <= 0 or height <= 0:
        raise ImageFormatError(f"{fmt.upper()} header gives an empty size {width}x{height}")
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return ImageInfo(fmt, width, height)


def _png(data: bytes) -> ImageInfo:
    # Chunks: length (4), type (4), data (length), CRC (4). IHDR comes first.
    pos = len(PNG_SIGNATURE)
    if data[pos + 4 : pos + 8] != b"IHDR" or len(data) < pos + 8 + 13:
        raise ImageFormatError("PNG without an IHDR header")
    width, height = struct.unpack(">II", data[pos + 8 : pos + 16])
    orientation = 1
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length:
            raise ImageFormatError(f"PNG truncated in its {kind.decode('latin-1')} chunk")
        if kind == b"eXIf":
            orientation = exif_orientation(body)
        if kind == b"IEND":
            break
        pos += 12 + length
    else:
        raise ImageFormatError("PNG truncated before IEND")
    return _oriented("png", width, height, orientation)


def _jpeg(data: bytes) -> ImageInfo:
    # Segments: 0xFF, marker, then (except standalone markers) a 2-byte length
    # that counts itself. The frame header (SOFn) holds the size; it comes
    # before the first scan (SOS), and so does the EXIF block (APP1).
    pos = len(JPEG_SOI)
    size: tuple[int, int] | None = None
    orientation = 1
    exif_seen = False  # PIL reads the first EXIF block only
    while True:
        if pos >= len(data) or data[pos] != 0xFF:
            raise ImageFormatError(f"JPEG marker expected at byte {pos}")
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= len(data):
            raise ImageFormatError("JPEG truncated in a marker")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (_SOS, _EOI):
            break
        if pos + 2 > len(data):
            raise ImageFormatError("JPEG truncated in a segment length")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        segment = data[pos + 2 : pos + length]
        if length < 2 or len(segment) < length - 2:
            raise ImageFormatError(f"JPEG truncated in segment 0x{marker:02X}")
        if marker in _SOF_MARKERS and size is None:
            if len(segment) < 5:
                raise ImageFormatError("JPEG frame header too short")
            height, width = struct.unpack(">HH", segment[1:5])
            size = (width, height)
        elif marker == _APP1 and segment.startswith(b"Exif\x00\x00") and not exif_seen:
            exif_seen = True
            orientation = exif_orientation(segment[6:])
        pos += length
    if size is None:
        raise ImageFormatError("JPEG without a frame header before its image data")
    return _oriented("jpeg", size[0], size[1], orientation)


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (1-8) of an EXIF block (TIFF layout); 1 when absent or malformed."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    endian = "<" if tiff[:2] == b"II" else ">"
    magic, ifd = struct.unpack(endian + "HI", tiff[2:8])
    if magic != 42 or ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(endian + "H", tiff[ifd : ifd + 2])
    for index in range(count):
        entry = tiff[ifd + 2 + 12 * index : ifd + 14 + 12 * index]
        if len(entry) < 12:
            return 1
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag == _ORIENTATION_TAG:
            (value,) = struct.unpack(endian + "H", entry[8:10])
            return value if kind == _TIFF_SHORT and 1 <= value <= 8 else 1
    return 1
