"""protocol.imagesize: PNG/JPEG pixel sizes from the header, EXIF orientation applied."""

from __future__ import annotations

import pytest

from protocol.imagesize import (
    MAX_EXIF_ENTRIES,
    MAX_HEADER_STEPS,
    ImageFormatError,
    ImageInfo,
    exif_orientation,
    image_info,
)
from tests.protocol.images import jpeg, jpeg_segment, png, png_chunk, tiff_orientation

DHT = jpeg_segment(0xC4, b"\x00" + b"\x00" * 16)  # a Huffman table: C4 is not a frame header


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (png(96, 64), ImageInfo("png", 96, 64)),
        (png(1, 16384), ImageInfo("png", 1, 16384)),
        (png(96, 64, exif=tiff_orientation(6)), ImageInfo("png", 64, 96)),
        (png(96, 64, exif=tiff_orientation(3)), ImageInfo("png", 96, 64)),
        # PIL also finds an eXIf chunk after the image data.
        (png(96, 64, exif=tiff_orientation(8), exif_after_idat=True), ImageInfo("png", 64, 96)),
        (jpeg(640, 480), ImageInfo("jpeg", 640, 480)),
        (jpeg(640, 480, exifs=(tiff_orientation(6),)), ImageInfo("jpeg", 480, 640)),
        (jpeg(640, 480, exifs=(tiff_orientation(5, order=b"MM"),)), ImageInfo("jpeg", 480, 640)),
        (jpeg(640, 480, exifs=(tiff_orientation(7),)), ImageInfo("jpeg", 480, 640)),
        (jpeg(640, 480, exifs=(tiff_orientation(2),)), ImageInfo("jpeg", 640, 480)),
        # Only the first EXIF block counts, as in PIL.
        (
            jpeg(640, 480, exifs=(tiff_orientation(1), tiff_orientation(6))),
            ImageInfo("jpeg", 640, 480),
        ),
        (jpeg(640, 480, sof=0xC2), ImageInfo("jpeg", 640, 480)),  # progressive
        (jpeg(33, 17, sof=0xCF), ImageInfo("jpeg", 33, 17)),
        (jpeg(640, 480, before_sof=DHT), ImageInfo("jpeg", 640, 480)),
        (jpeg(640, 480, before_sof=b"\xff\xff\xff"), ImageInfo("jpeg", 640, 480)),  # fill bytes
        (jpeg(640, 480, before_sof=b"\xff\x01"), ImageInfo("jpeg", 640, 480)),  # standalone TEM
    ],
)
def test_sizes(data: bytes, expected: ImageInfo) -> None:
    assert image_info(data) == expected


def test_content_types() -> None:
    assert image_info(png(1, 1)).content_type == "image/png"
    assert image_info(jpeg(1, 1)).content_type == "image/jpeg"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a PNG or JPEG"),
        (b"GIF89a\x01\x00\x01\x00", "not a PNG or JPEG"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "not a PNG or JPEG"),
        (b"\x89PNG\r\n\x1a\n", "without an IHDR"),
        (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IDAT", b""), "without an IHDR"),
        (png(96, 64)[:33], "truncated before IEND"),
        (png(96, 64)[:45], "truncated in its IDAT chunk"),
        (png(0, 64), "empty size 0x64"),
        (png(64, 0), "empty size 64x0"),
        (b"\xff\xd8", "marker expected at byte 2"),
        (b"\xff\xd8\x00", "marker expected at byte 2"),
        (b"\xff\xd8\xff\xff", "truncated in a marker"),
        (b"\xff\xd8\xff\xc0\x00", "truncated in a segment length"),
        (b"\xff\xd8\xff\xc0\x00\x10\x08", "truncated in segment 0xC0"),
        (b"\xff\xd8\xff\xe0\x00\x01", "truncated in segment 0xE0"),  # length < 2
        (b"\xff\xd8\xff\xc0\x00\x04\x08\x00", "frame header too short"),
        (b"\xff\xd8\xff\xda\x00\x02", "without a frame header"),
        (b"\xff\xd8\xff\xd9", "without a frame header"),
        (jpeg(640, 0), "empty size 640x0"),
        (jpeg(0, 480), "empty size 0x480"),
    ],
)
def test_unreadable_images(data: bytes, message: str) -> None:
    with pytest.raises(ImageFormatError, match=message.replace("(", r"\(")):
        image_info(data)


@pytest.mark.parametrize(
    ("tiff", "orientation"),
    [
        (tiff_orientation(6), 6),
        (tiff_orientation(8, order=b"MM"), 8),
        (tiff_orientation(1), 1),
        (b"", 1),
        (b"II*\x00", 1),  # too short for the IFD offset
        (b"XX" + tiff_orientation(6)[2:], 1),  # no byte order mark
        (b"II\x2b\x00" + tiff_orientation(6)[4:], 1),  # magic 43, not 42
        (tiff_orientation(6)[:4] + b"\xff\x00\x00\x00", 1),  # IFD beyond the block
        (tiff_orientation(6)[:12], 1),  # entry cut short
        (tiff_orientation(6, kind=4), 1),  # a LONG, not a SHORT
        (tiff_orientation(9), 1),
        (tiff_orientation(0), 1),
    ],
)
def test_exif_orientation(tiff: bytes, orientation: int) -> None:
    assert exif_orientation(tiff) == orientation


def test_a_png_the_simulator_draws() -> None:
    from daemon.simulator.png import encode_png

    data = encode_png(96, 64, [bytes((10, 200, 30)) * 96] * 64, text={"prompt": "{}"})
    assert image_info(data) == ImageInfo("png", 96, 64)


# A hostile header: the reader gives up after a fixed amount of work, so no
# upload can keep the daemon busy (a 20 MiB JPEG of empty comments took 6.6 s).
EMPTY_COMMENT = b"\xff\xfe\x00\x02"


@pytest.mark.parametrize(
    "data",
    [
        jpeg(64, 64, before_sof=EMPTY_COMMENT * (MAX_HEADER_STEPS + 1)),
        jpeg(64, 64, before_sof=b"\xff" * (MAX_HEADER_STEPS + 1) + b"\x01"),
        jpeg(64, 64, before_sof=(b"\xff" * 50 + b"\x01") * (MAX_HEADER_STEPS // 50)),
        png(64, 64).replace(
            png_chunk(b"IEND", b""),
            png_chunk(b"tEXt", b"") * (MAX_HEADER_STEPS + 1) + png_chunk(b"IEND", b""),
        ),
    ],
    ids=["empty-jpeg-segments", "fill-bytes", "fill-byte-runs", "empty-png-chunks"],
)
def test_a_header_that_takes_too_much_work_is_refused(data: bytes) -> None:
    with pytest.raises(ImageFormatError, match=f"gave up after {MAX_HEADER_STEPS}"):
        image_info(data)


def test_many_idat_chunks_of_a_large_png_are_fine() -> None:
    idat = png_chunk(b"IDAT", b"\0" * 8192)
    data = png(64, 64).replace(
        png_chunk(b"IEND", b""), idat * (MAX_HEADER_STEPS // 2) + png_chunk(b"IEND", b"")
    )
    assert image_info(data) == ImageInfo("png", 64, 64)


def test_an_exif_block_with_too_many_entries_counts_as_no_rotation() -> None:
    tiff = tiff_orientation(6)
    entries = b"\0" * 12 * MAX_EXIF_ENTRIES
    crowded = tiff[:8] + (MAX_EXIF_ENTRIES + 1).to_bytes(2, "little") + tiff[10:22] + entries
    assert exif_orientation(crowded) == 1
    assert exif_orientation(tiff) == 6
