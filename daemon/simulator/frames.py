"""WebSocket frame encodings: JSON text frames and ComfyUI's binary frames (FACTS §4)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
JPEG_FORMAT = 1  # bytes 4-7 of a type-1 frame: 1 JPEG, 2 PNG
PNG_FORMAT = 2
MEDIA_TYPES = {JPEG_FORMAT: "image/jpeg", PNG_FORMAT: "image/png"}


@dataclass(frozen=True)
class EncodedPreview:
    """A preview image ready for the wire: its format code (1 JPEG, 2 PNG) and bytes."""

    image_format: int
    data: bytes = field(repr=False)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.image_format]


def text_frame(event: str, data: Any) -> str:
    """`{"type": event, "data": data}` with json.dumps defaults, like aiohttp's send_json."""
    return json.dumps({"type": event, "data": data})


def progress_text_frame(node_id: str, text: str) -> bytes:
    """Type 3: u32 length of node_id, node_id, then the text."""
    node = node_id.encode("utf-8")
    return struct.pack(">II", TEXT, len(node)) + node + text.encode("utf-8")


def preview_frame(image: bytes, image_format: int = PNG_FORMAT) -> bytes:
    """Type 1 (legacy preview): u32 image format, then the image."""
    return struct.pack(">II", PREVIEW_IMAGE, image_format) + image


def preview_with_metadata_frame(image: bytes, metadata: dict[str, Any]) -> bytes:
    """Type 4: u32 length of the metadata JSON, the JSON (naming image_type), then the image."""
    meta = json.dumps(metadata).encode("utf-8")
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image
