"""A baseline JPEG writer for latent-style previews, pure Python.

ComfyUI's sampler previews are JPEG by default, and they show the latent, which
has 1/8 of the image's resolution, scaled up: every 8x8 block of a preview is
one latent pixel. So a block-flat image is a faithful preview, and a flat block
has only a DC coefficient. This writer therefore codes each 8x8 block as its
DC value and an end-of-block (baseline, 4:4:4 YCbCr, one scan), sampled at the
block's centre: thousands of blocks cost milliseconds, with no image library.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# Annex K.3 luminance DC table: code-length counts (1..16 bits), then the symbols.
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
_DC_VALUES = tuple(range(12))
# Every AC run is the end-of-block symbol 0x00 alone: one 1-bit code.
_AC_BITS = (1,) + (0,) * 15
_AC_VALUES = (0x00,)
_QUANT = 8  # a flat block's DC coefficient is 8 * (level - 128); /8 keeps whole levels


def _huffman_codes(bits: Sequence[int], values: Sequence[int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length), canonical as in JPEG Annex C."""
    codes: dict[int, tuple[int, int]] = {}
    code, k = 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[values[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


_DC_CODES = _huffman_codes(_DC_BITS, _DC_VALUES)
_EOB = _huffman_codes(_AC_BITS, _AC_VALUES)[0x00]


class _BitWriter:
    def __init__(self) -> None:
        self.out = bytearray()
        self._acc = 0
        self._n = 0

    def write(self, code: int, length: int) -> None:
        self._acc = (self._acc << length) | code
        self._n += length
        while self._n >= 8:
            self._n -= 8
            byte = (self._acc >> self._n) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0x00)  # byte stuffing
        self._acc &= (1 << self._n) - 1

    def flush(self) -> bytes:
        if self._n:
            self.write((1 << (8 - self._n)) - 1, 8 - self._n)  # pad with 1 bits
        return bytes(self.out)


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", 0xFF00 | marker, len(payload) + 2) + payload


def _dht(table_class: int, bits: Sequence[int], values: Sequence[int]) -> bytes:
    return bytes((table_class << 4,)) + bytes(bits) + bytes(values)


def encode_jpeg(width: int, height: int, rows: Sequence[bytes]) -> bytes:
    """Encode `height` rows of `width` RGB pixels (3 bytes each), one level per 8x8 block."""
    if len(rows) != height or any(len(row) != 3 * width for row in rows):
        raise ValueError("rows do not match the image size")
    header = b"".join(
        [
            b"\xff\xd8",  # SOI
            _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            _segment(0xDB, b"\x00" + bytes((_QUANT,)) * 64),
            _segment(
                0xC0,
                struct.pack(">BHHB", 8, height, width, 3)
                + b"".join(bytes((c, 0x11, 0)) for c in (1, 2, 3)),
            ),
            _segment(0xC4, _dht(0, _DC_BITS, _DC_VALUES) + _dht(1, _AC_BITS, _AC_VALUES)),
            _segment(0xDA, b"\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00"),
        ]
    )
    bits = _BitWriter()
    previous = [0, 0, 0]
    for by in range(0, height, 8):
        row = rows[min(by + 4, height - 1)]
        for bx in range(0, width, 8):
            x = 3 * min(bx + 4, width - 1)
            r, g, b = row[x], row[x + 1], row[x + 2]
            levels = (
                0.299 * r + 0.587 * g + 0.114 * b,
                -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
                0.5 * r - 0.418688 * g - 0.081312 * b + 128,
            )
            for c, level in enumerate(levels):
                dc = max(-128, min(127, round(level) - 128))
                diff, previous[c] = dc - previous[c], dc
                size = abs(diff).bit_length()
                bits.write(*_DC_CODES[size])
                if size:
                    bits.write(diff if diff > 0 else diff + (1 << size) - 1, size)
                bits.write(*_EOB)
    return header + bits.flush() + b"\xff\xd9"
