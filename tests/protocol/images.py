"""Tiny PNG and JPEG files built byte by byte, with the header fields the tests need."""

from __future__ import annotations

import struct
import zlib


def tiff_orientation(orientation: int, *, order: bytes = b"II", kind: int = 3) -> bytes:
    """An EXIF block (TIFF layout) holding one Orientation entry."""
    e = "<" if order == b"II" else ">"
    entry = struct.pack(e + "HHI", 0x0112, kind, 1) + struct.pack(e + "H", orientation) + b"\0\0"
    return order + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1) + entry + b"\0" * 4


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(
    width: int, height: int, *, exif: bytes | None = None, exif_after_idat: bool = False
) -> bytes:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 4))
    exif_chunk = png_chunk(b"eXIf", exif) if exif is not None else b""
    body = idat + exif_chunk if exif_after_idat else exif_chunk + idat
    return b"\x89PNG\r\n\x1a\n" + ihdr + body + png_chunk(b"IEND", b"")


def jpeg_segment(marker: int, data: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(data) + 2) + data


def jpeg(
    width: int,
    height: int,
    *,
    exifs: tuple[bytes, ...] = (),
    sof: int = 0xC0,
    before_sof: bytes = b"",
) -> bytes:
    app1 = b"".join(jpeg_segment(0xE1, b"Exif\0\0" + tiff) for tiff in exifs)
    jfif = jpeg_segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0")
    frame = jpeg_segment(sof, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\x34\x56"
    return b"\xff\xd8" + app1 + jfif + before_sof + frame + scan + b"\xff\xd9"
