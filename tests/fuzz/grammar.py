"""Hostile HTTP/1.1 requests, as raw bytes: the fuzzer's grammar.

One grammar, two sources of choices: Hypothesis (`requests()`, shrinks a
failure to a small request) in the test suite, and a seeded `random.Random`
(`RandomSource`) in `make fuzz`, which sends far more requests than
Hypothesis could generate in the same time.

What it covers: request lines (methods, targets with percent-encoding and
path traversal, versions), headers (the ones the daemon reads, random and
malformed ones, oversized heads), bodies (JSON, near-JSON, images, bytes) and
framing (Content-Length right or wrong, chunked right or wrong, both at
once, unknown transfer codings, pipelined requests, bare LF line endings).
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from hypothesis import strategies as st

T = TypeVar("T")


class Source(Protocol):
    """Where the grammar's choices come from."""

    def choice(self, options: Sequence[T]) -> T: ...
    def integer(self, low: int, high: int) -> int: ...
    def raw(self, max_size: int) -> bytes: ...
    def text(self, max_size: int) -> str: ...


class RandomSource:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def raw(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))

    def text(self, max_size: int) -> str:
        # Mostly ASCII, with some Latin-1, other planes and lone surrogates.
        alphabet = (0x20, 0x7E), (0x00, 0x1F), (0x80, 0xFF), (0x100, 0xFFFF), (0x10000, 0x10FFFF)
        chars = []
        for _ in range(self.rng.randint(0, max_size)):
            low, high = alphabet[0] if self.rng.random() < 0.8 else self.rng.choice(alphabet)
            chars.append(chr(self.rng.randint(low, high)))
        return "".join(chars)


class HypothesisSource:
    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def raw(self, max_size: int) -> bytes:
        return self.draw(st.binary(max_size=max_size))

    def text(self, max_size: int) -> str:
        return self.draw(st.text(max_size=max_size))


def chance(src: Source, percent: int) -> bool:
    # Shrinks (towards 0) to False: a failing example loses its optional parts.
    return src.integer(0, 99) >= 100 - percent


@dataclass(frozen=True)
class Context:
    """What exists on the daemon under test: ids of finished tasks, stored image names."""

    task_ids: tuple[str, ...]
    image_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FuzzRequest:
    raw: bytes
    # Half-close after sending (the server sees EOF at once) rather than wait
    # for the server's own timeouts.
    half_close: bool

    def __repr__(self) -> str:
        shown = self.raw if len(self.raw) <= 600 else self.raw[:600] + b"..."
        return f"FuzzRequest(half_close={self.half_close}, {len(self.raw)} bytes: {shown!r})"


METHODS = ("GET", "GET", "HEAD", "POST", "POST", "DELETE", "PUT", "OPTIONS", "PATCH", "TRACE")
ODD_METHODS = ("CONNECT", "get", "G\tET", "GET GET", "", "PRI", "M-SEARCH", "X" * 300, "GE\x00T")
VERSIONS = ("HTTP/1.1",) * 8 + ("HTTP/1.0", "HTTP/1.0")
ODD_VERSIONS = ("HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "http/1.1", "", "HTTP/1.1 x", "HTTP/11")
ROUTES = (
    "/",
    "/index.html",
    "/js/main.mjs",
    "/css/app.css",
    "/generate",
    "/upload",
    "/progress/{task}",
    "/tasks/{task}",
    "/healthz",
    "/readyz",
    "/workflows",
    "/metrics",
    "/image/{image}",
    "/vendor/preact/dist/preact.mjs",
    "/vendor/htm/dist/htm.mjs",
    "/nowhere",
)
TRAVERSALS = (
    "../",
    "..%2f",
    "..%2F",
    "%2e%2e/",
    "%2e%2e%2f",
    "..\\",
    "..%5c",
    "....//",
    "%252e%252e/",
    "%c0%ae%c0%ae/",
    ".%2e/",
    "/./",
    "//",
)
SECRETS = ("etc/passwd", "pyproject.toml", "data/journal.sqlite3", "daemon/app.py", "..", "")
PERCENT_JUNK = (
    "%ff",
    "%FF%FE",
    "%zz",
    "%",
    "%4",
    "%00",
    "%0a",
    "%2F",
    "%20",
    "%e2%91%a0",
    "%ed%a0%80",
)
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/merge-patch+json",
    "text/plain",
    "image/png",
    "image/jpeg",
    "multipart/form-data; boundary=x",
    "",
    "application/json\x00",
)
LAST_EVENT_IDS = (
    "0",
    "1",
    "3",
    "-1",
    "1\xb2",
    "\xb2",
    "9" * 5000,
    "99999999999999999999999",
    " 2 ",
    "0x10",
    "1e3",
)
GOOD_BODIES: tuple[object, ...] = (
    {"prompt": "a red fox"},
    {"prompt": "a red fox", "seed": 7, "width": 512, "height": 512},
    {"prompt": "fox", "workflow": "nope"},
    {"prompt": "fox", "width": 513},
    {"prompt": ""},
    {"prompt": "x" * 5000},
    {"prompt": "fox", "description": "\ud800"},  # a lone surrogate: 400 at the door
    {"prompt": "fox", "name": "\x00"},
    {"prompt": None},
    {"prompt": ["a"]},
    {},
    [],
    "prompt",
    1e308,
    {"prompt": "fox", "seed": -1},
    {"prompt": "fox", "seed": 2**64},
)


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * 3 * width for _ in range(height)))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


VALID_PNG = _png(16, 16)
PNG_HEAD = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"
)
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xc0\x00\x11"


def _bytes(text: str) -> bytes:
    """Latin-1 when it fits (so "\xb2" is the byte 0xB2), else UTF-8 (lone surrogates too)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def method(src: Source) -> bytes:
    if chance(src, 5):
        return _bytes(src.choice(ODD_METHODS))
    if chance(src, 2):
        return src.raw(12)
    return src.choice(METHODS).encode()


def path(src: Source, ctx: Context, route: str) -> str:
    task = src.choice(ctx.task_ids) if ctx.task_ids and chance(src, 70) else src.text(40)
    image = src.choice(ctx.image_names) if ctx.image_names and chance(src, 50) else "x.png"
    if chance(src, 10):
        task = src.choice(("", ".", "..", "%2e%2e", "a/b", "%2F", task + "/extra", task * 3))
    return route.replace("{task}", task).replace("{image}", image)


def target(src: Source, ctx: Context, route: str) -> bytes:
    if chance(src, 5):
        return src.choice((b"*", b"", b"example.com:80", b"http://", b" ", b"/\x7f", b"/a b"))
    text = path(src, ctx, route)
    if chance(src, 20):
        steps = "".join(src.choice(TRAVERSALS) for _ in range(src.integer(1, 6)))
        prefix = src.choice(("/", "/vendor/preact/", "/image/", "/js/", "/css/", "/progress/"))
        text = prefix + steps + src.choice(SECRETS)
    if chance(src, 15):
        at = src.integer(0, len(text))
        text = text[:at] + src.choice(PERCENT_JUNK) + text[at:]
    if chance(src, 20):
        text += "?" + _query(src)
    if chance(src, 5):
        text = src.choice(("http://127.0.0.1", "http://evil.example", "https://x:1")) + text
    if chance(src, 2):
        text = text + "a" * src.choice((1000, 8000, 20000))
    raw = _bytes(text)
    if chance(src, 5):
        at = src.integer(0, len(raw))
        raw = raw[:at] + src.raw(4) + raw[at:]
    return raw


def _query(src: Source) -> str:
    if chance(src, 50):
        return "lastEventId=" + src.choice(LAST_EVENT_IDS)
    return src.choice(("a=b&a=c", "=", "&&", "x", "lastEventId", "%ff=%fe", "a=" + src.text(20)))


def headers(src: Source, body_type: str) -> list[bytes]:
    lines: list[bytes] = []
    if not chance(src, 5):
        host = (
            src.choice((b"127.0.0.1", b"localhost:8000", b"", b"a b", b"\xff"))
            if chance(src, 5)
            else b"127.0.0.1"
        )
        lines.append(b"Host: " + host)
    if chance(src, 8):
        lines.append(b"Host: second.example")
    if body_type and not chance(src, 20):
        lines.append(b"Content-Type: " + _bytes(body_type))
    elif body_type or chance(src, 10):
        lines.append(b"Content-Type: " + _bytes(src.choice(CONTENT_TYPES)))
    if chance(src, 15):
        lines.append(b"Last-Event-ID: " + _bytes(src.choice(LAST_EVENT_IDS)))
    if chance(src, 10):
        key = src.choice(("k1", "k2", "", " ", "\x7f", "a" * 300, "ok-key"))
        lines.append(b"Idempotency-Key: " + _bytes(key))
    if chance(src, 8):
        lines.append(b"Expect: " + src.choice((b"100-continue", b"200-ok", b"")))
    if chance(src, 10):
        value = src.choice((b"close", b"keep-alive", b"upgrade", b"Upgrade, close", b"te"))
        lines.append(b"Connection: " + value)
    if chance(src, 4):
        lines.append(b"Upgrade: " + src.choice((b"websocket", b"h2c", b"")))
    if chance(src, 8):
        name = src.choice(
            (b"Range", b"If-None-Match", b"If-Modified-Since", b"Accept-Encoding", b"Origin")
        )
        value = src.choice((b"bytes=0-1", b"*", b"gzip", b"Thu, 01 Jan 1970 00:00:00 GMT", b"x"))
        lines.append(name + b": " + value)
    for _ in range(src.integer(0, 2) if chance(src, 20) else 0):
        lines.append(_odd_header(src))
    if chance(src, 2):
        lines.append(b"X-Big: " + b"a" * src.choice((4000, 17000, 70000)))
    if chance(src, 1):
        lines.extend(b"X-Many: 1" for _ in range(src.choice((100, 1000, 3000))))
    return lines


def _odd_header(src: Source) -> bytes:
    kind = src.integer(0, 7)
    if kind == 0:
        return b" folded continuation"  # obs-fold: a line starting with a space
    if kind == 1:
        return b"NoColon"
    if kind == 2:
        return b": empty name"
    if kind == 3:
        return b"Bad Name: x"
    if kind == 4:
        return b"X-Ctl: a\x00b"
    if kind == 5:
        return b"X-Raw: " + src.raw(30).replace(b"\r", b"").replace(b"\n", b"")
    if kind == 6:
        return b"X-Text: " + _bytes(src.text(30)).replace(b"\r", b"").replace(b"\n", b"")
    return src.raw(20)


def body(src: Source, route: str) -> tuple[bytes, str]:
    """A body and the Content-Type it claims to be (may be "")."""
    if route == "/upload" and chance(src, 50):
        return VALID_PNG, "image/png"
    kind = src.integer(0, 9)
    if kind <= 3:
        value = src.choice(GOOD_BODIES[:2] if chance(src, 50) else GOOD_BODIES)
        return _bytes(json.dumps(value, ensure_ascii=False)), "application/json"
    if kind == 4:
        text = json.dumps(src.choice(GOOD_BODIES))
        cut = src.integer(0, len(text))
        return text[:cut].encode() + src.raw(8), "application/json"
    if kind == 5 and chance(src, 30):
        return VALID_PNG, src.choice(("image/png", "image/png", "image/jpeg", ""))
    if kind == 5:
        return src.choice((PNG_HEAD, JPEG_HEAD)) + src.raw(200), src.choice(("image/png", ""))
    if kind == 6:
        return b"\xed\xa0\x80" + src.raw(40), "application/json"  # raw surrogate bytes
    if kind == 7 and chance(src, 5):
        return b"{" * src.choice((1000, 100_000)), "application/json"  # deep nesting
    if kind == 7 and chance(src, 10):
        return b"x" * (1024 * 1024 + 1), ""  # just over max_body_bytes
    return src.raw(300), ""


def framing(src: Source, payload: bytes) -> tuple[list[bytes], bytes]:
    """Framing headers and the bytes that follow the head."""
    kind = src.integer(0, 29)
    length = str(len(payload)).encode()
    if kind <= 8 or kind >= 19:
        return ([b"Content-Length: " + length] if payload or chance(src, 30) else []), payload
    if kind <= 10:
        return [b"Transfer-Encoding: chunked"], _chunked(src, payload)
    if kind == 11:  # both: Transfer-Encoding wins, the connection must close afterwards
        return [b"Content-Length: " + length, b"Transfer-Encoding: chunked"], _chunked(src, payload)
    if kind == 12:
        delta = src.choice((-1, 1, 5, -len(payload)))
        return [b"Content-Length: " + str(max(0, len(payload) + delta)).encode()], payload
    if kind == 13:
        value = src.choice((b"abc", b"-1", b"1e3", b" 5", b"0x10", b"99999999999999999999", b""))
        return [b"Content-Length: " + value], payload
    if kind == 14:
        return [b"Content-Length: " + length, b"Content-Length: " + length + b"0"], payload
    if kind == 15:
        coding = src.choice((b"gzip", b"chunked, gzip", b"gzip, chunked", b"Chunked", b"identity"))
        return [b"Transfer-Encoding: " + coding], _chunked(src, payload)
    if kind == 16:
        return [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], _chunked(
            src, payload
        )
    if kind == 17:
        return [b"Transfer-Encoding: chunked"], _bad_chunked(src, payload)
    return [], payload  # kind 18: a body without framing, read as the next request


def _chunked(src: Source, payload: bytes) -> bytes:
    out = b""
    rest = payload
    while rest:
        size = src.integer(1, max(1, len(rest)))
        extension = b";ext=1" if chance(src, 5) else b""
        out += f"{size:x}".encode() + extension + b"\r\n" + rest[:size] + b"\r\n"
        rest = rest[size:]
    trailer = b"X-Trailer: 1\r\n" if chance(src, 5) else b""
    return out + b"0\r\n" + trailer + b"\r\n"


def _bad_chunked(src: Source, payload: bytes) -> bytes:
    return src.choice(
        (
            b"zz\r\n" + payload + b"\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n" + payload,
            f"{len(payload) + 3:x}\r\n".encode() + payload + b"\r\n0\r\n\r\n",
            f"{len(payload):x}\r\n".encode() + payload + b"0\r\n\r\n",
            b"-1\r\n\r\n",
            b"0\r\n",
            b"5\r\nab",
            b"0\r\nBad Trailer\r\n\r\n",
        )
    )


# Most requests use a method the route serves, so they reach the handlers.
SENSIBLE_METHODS = {
    "/generate": ("POST",),
    "/upload": ("POST",),
    "/tasks/{task}": ("GET", "HEAD", "DELETE"),
}


def request(src: Source, ctx: Context) -> FuzzRequest:
    route = src.choice(ROUTES)
    if chance(src, 30):
        verb = method(src)
    else:
        verb = src.choice(SENSIBLE_METHODS.get(route, ("GET", "GET", "HEAD"))).encode()
    wants_body = verb == b"POST" or chance(src, 10)
    payload, body_type = body(src, route) if wants_body else (b"", "")
    frame_headers, after_head = framing(src, payload)
    version = src.choice(ODD_VERSIONS) if chance(src, 4) else src.choice(VERSIONS)
    line = verb + b" " + target(src, ctx, route) + (b" " + version.encode() if version else b"")
    lines = [line, *headers(src, body_type), *frame_headers]
    if chance(src, 10):
        order = list(range(1, len(lines)))
        src_order = [src.integer(0, 1000) for _ in order]
        lines = [lines[0], *(lines[i] for _, i in sorted(zip(src_order, order, strict=True)))]
    newline = src.choice((b"\n", b"\r", b"\r\r\n")) if chance(src, 4) else b"\r\n"
    raw = newline.join(lines) + newline + newline + after_head
    if chance(src, 10):  # pipelined: a second request right behind
        raw += b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    if chance(src, 3):  # cut short
        raw = raw[: src.integer(0, len(raw))]
    if chance(src, 2):
        raw = src.raw(200)
    return FuzzRequest(raw, half_close=not chance(src, 3))


@st.composite
def requests(draw: st.DrawFn, ctx: Context) -> FuzzRequest:
    """The Hypothesis strategy of the grammar's requests."""
    return request(HypothesisSource(draw), ctx)
