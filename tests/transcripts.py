"""Read the ComfyUI transcripts in tests/fixtures/comfyui/ (format: README.md there)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui"


def transcript_names() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.jsonl"))


def load(name: str) -> list[dict[str, Any]]:
    with (FIXTURES / f"{name}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def rebuild_binary(frame: dict[str, Any]) -> bytes:
    """The transcripts keep a binary frame's header and a decode; rebuild the bytes.

    Image payloads are stand-ins of the recorded length that start with the
    recorded magic bytes (the pixels themselves were not captured).
    """
    event_type: int = frame["event_type"]
    second: int = frame["second_u32"]
    if event_type == 3:
        node_id = str(frame["node_id"]).encode()
        assert len(node_id) == second
        return struct.pack(">II", 3, second) + node_id + str(frame["text"]).encode()
    if event_type == 1:
        magic = bytes.fromhex(frame.get("image_magic_hex", "89504e470d0a1a0a"))
        image = magic + b"\0" * (int(frame["image_len"]) - len(magic))
        return struct.pack(">II", 1, second) + image
    if event_type == 4:
        metadata = json.dumps(frame["metadata"], separators=(",", ":")).encode()
        image = b"\x89PNG\r\n\x1a\n" + b"\0" * (int(frame["image_len"]) - 8)
        return struct.pack(">II", 4, len(metadata)) + metadata + image
    raise ValueError(f"unknown binary event type {event_type}")


@dataclass
class Submission:
    """One POST /prompt of a transcript and what it was answered."""

    transcript: str
    label: str
    seq: int
    status: int
    request: dict[str, Any]
    reply: Any  # parsed JSON body, or the raw text for non-JSON replies
    client_id: str | None
    prompt_id: str | None
    histories: list[Any] = field(default_factory=list)  # later GET /history/{id} bodies

    @property
    def raw_reply(self) -> bytes:
        if isinstance(self.reply, str):
            return self.reply.encode()
        return json.dumps(self.reply).encode()


def submissions(name: str) -> list[Submission]:
    records = load(name)
    subs: list[Submission] = []
    for r in records:
        if r["kind"] != "http" or r["method"] != "POST" or r["path"] != "/prompt":
            continue
        body = r.get("body", r.get("body_text"))
        request = r.get("request") or {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        subs.append(
            Submission(
                transcript=name,
                label=r["label"],
                seq=r["seq"],
                status=r["status"],
                request=request if isinstance(request, dict) else {},
                reply=body,
                client_id=request.get("client_id") if isinstance(request, dict) else None,
                prompt_id=prompt_id,
            )
        )
    for sub in subs:
        if sub.prompt_id is None:
            continue
        for r in records:
            if r["kind"] == "http" and r["path"] == f"/history/{sub.prompt_id}":
                sub.histories.append(r["body"])
    return subs


def frames_for_client(name: str, client_id: str | None) -> Iterator[str | bytes]:
    """Every frame the sockets of one client id received, in order.

    client_id None means "every socket" (the s10 prompts carried no client id,
    so what reached anyone was a broadcast).
    """
    records = load(name)
    conns = {
        r["conn"]
        for r in records
        if r["kind"] == "ws_open" and (client_id is None or r["client_id"] == client_id)
    }
    seen_text: set[str] = set()
    for r in records:
        if r.get("conn") not in conns:
            continue
        if r["kind"] == "ws_text":
            text = json.dumps(r["msg"])
            if client_id is None:
                # Broadcasts reach every listener: keep one copy.
                key = f"{r['seq']}"
                if key in seen_text:
                    continue
                seen_text.add(key)
            yield text
        elif r["kind"] == "ws_binary":
            yield rebuild_binary(r["frame"])


def all_frames() -> Iterator[tuple[str, dict[str, Any], str | bytes]]:
    """(transcript, record, frame) for every received frame of every transcript."""
    for name in transcript_names():
        for r in load(name):
            if r["kind"] == "ws_text":
                yield name, r, json.dumps(r["msg"])
            elif r["kind"] == "ws_binary":
                yield name, r, rebuild_binary(r["frame"])
