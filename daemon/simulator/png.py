"""A small PNG writer (8-bit RGB, no filtering) and an IHDR size reader, pure Python."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _text_chunk(key: str, value: str) -> bytes:
    # tEXt is Latin-1 only; like Pillow, fall back to an uncompressed iTXt chunk.
    keyword = key.encode("latin-1")
    try:
        return _chunk(b"tEXt", keyword + b"\x00" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", keyword + b"\x00\x00\x00\x00\x00" + value.encode("utf-8"))


def encode_png(
    width: int,
    height: int,
    rows: Sequence[bytes],
    *,
    text: Mapping[str, str] | None = None,
    level: int = 6,
) -> bytes:
    """Encode `height` rows of `width` RGB pixels (3 bytes each) as a PNG file."""
    if len(rows) != height or any(len(row) != 3 * width for row in rows):
        raise ValueError("rows do not match the image size")
    # Filter type 0 (None) on every row: the data is already highly repetitive.
    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    chunks.extend(_text_chunk(k, v) for k, v in (text or {}).items())
    chunks.append(_chunk(b"IDAT", zlib.compress(raw, level)))
    chunks.append(_chunk(b"IEND", b""))
    return SIGNATURE + b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if `data` is not a PNG."""
    if len(data) < 24 or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)
