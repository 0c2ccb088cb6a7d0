"""WebSocket frame encodings: JSON text frames and ComfyUI's binary frames (FACTS §4)."""

from __future__ import annotations

import json
import struct
from typing import Any

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
PNG_FORMAT = 2  # bytes 4-7 of a type-1 frame: 1 JPEG, 2 PNG


def text_frame(event: str, data: Any) -> str:
    """`{"type": event, "data": data}` with json.dumps defaults, like aiohttp's send_json."""
    return json.dumps({"type": event, "data": data})


def progress_text_frame(node_id: str, text: str) -> bytes:
    """Type 3: u32 length of node_id, node_id, then the text."""
    node = node_id.encode("utf-8")
    return struct.pack(">II", TEXT, len(node)) + node + text.encode("utf-8")


def preview_frame(png: bytes) -> bytes:
    """Type 1 (legacy preview): u32 image format, then the image."""
    return struct.pack(">II", PREVIEW_IMAGE, PNG_FORMAT) + png


def preview_with_metadata_frame(png: bytes, metadata: dict[str, Any]) -> bytes:
    """Type 4: u32 length of the metadata JSON, the JSON, then the image."""
    meta = json.dumps(metadata).encode("utf-8")
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + png
