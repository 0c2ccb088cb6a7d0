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
# The most chunks, segments and fill bytes a header may take (see _Budget).
MAX_HEADER_STEPS: Final = 10_000
# EXIF directories hold tens of entries; more counts as malformed (no rotation).
MAX_EXIF_ENTRIES: Final = 1_000


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


class _Budget:
    """Header reading gives up after a fixed amount of work, whatever the file holds.

    A hostile file can be millions of empty JPEG segments, fill bytes or empty
    PNG chunks; each costs one step, and real files need a few hundred at most
    (a 20 MiB PNG cut in libpng's 8 KiB IDAT chunks is about 2,600).
    """

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_HEADER_STEPS

    def spend(self, steps: int, fmt: str) -> None:
        self.left -= steps
        if self.left < 0:
            raise ImageFormatError(
                f"{fmt} header too long: gave up after {MAX_HEADER_STEPS} chunks, segments "
                "or fill bytes"
            )


def _png(data: bytes) -> ImageInfo:
    # Chunks: length (4), type (4), data (length), CRC (4). IHDR comes first.
    pos = len(PNG_SIGNATURE)
    if data[pos + 4 : pos + 8] != b"IHDR" or len(data) < pos + 8 + 13:
        raise ImageFormatError("PNG without an IHDR header")
    width, height = struct.unpack_from(">II", data, pos + 8)
    orientation = 1
    budget = _Budget()
    while pos + 8 <= len(data):
        budget.spend(1, "PNG")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        if pos + 8 + length > len(data):
            raise ImageFormatError(f"PNG truncated in its {kind.decode('latin-1')} chunk")
        if kind == b"eXIf":
            orientation = exif_orientation(data[pos + 8 : pos + 8 + length])
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
    budget = _Budget()
    while True:
        budget.spend(1, "JPEG")
        if pos >= len(data) or data[pos] != 0xFF:
            raise ImageFormatError(f"JPEG marker expected at byte {pos}")
        fill_start = pos
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes
            pos += 1
            if pos - fill_start > budget.left:
                budget.spend(pos - fill_start, "JPEG")
        budget.spend(pos - fill_start - 1, "JPEG")
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
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > len(data):
            raise ImageFormatError(f"JPEG truncated in segment 0x{marker:02X}")
        if marker in _SOF_MARKERS and size is None:
            if length < 2 + 5:
                raise ImageFormatError("JPEG frame header too short")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = (width, height)
        elif (
            marker == _APP1
            and data.startswith(b"Exif\x00\x00", pos + 2, pos + length)
            and not exif_seen
        ):
            exif_seen = True
            orientation = exif_orientation(data[pos + 8 : pos + length])
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
    if count > MAX_EXIF_ENTRIES:
        return 1
    for index in range(count):
        entry = tiff[ifd + 2 + 12 * index : ifd + 14 + 12 * index]
        if len(entry) < 12:
            return 1
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag == _ORIENTATION_TAG:
            (value,) = struct.unpack(endian + "H", entry[8:10])
            return value if kind == _TIFF_SHORT and 1 <= value <= 8 else 1
    return 1
