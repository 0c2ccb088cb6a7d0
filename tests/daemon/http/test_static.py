"""StaticFiles behind a Router and a real server: types, caching, index, traversal."""

from __future__ import annotations

import dataclasses
import os
import time
from email.utils import formatdate
from pathlib import Path

import pytest
import trio

from daemon.http import Router, StaticFiles, content_type_for, http_request
from daemon.http.static import SLICE_BYTES, STREAM_ABOVE_BYTES, safe_parts
from daemon.http.types import Headers, Request, StreamingResponse
from tests.daemon.http.helpers import H11Client, RunningServer, start_server

FILES = {
    "index.html": b"<!doctype html><title>home</title>",
    "js/main.mjs": b"export const x = 1;\n",
    "js/legacy.js": b"var y = 2;\n",
    "css/site.css": b"body { color: red }\n",
    "img/logo.png": b"\x89PNG\r\n\x1a\nfake",
    "img/icon.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    "data/info.json": b'{"a": 1}',
    "docs/index.html": b"<p>docs</p>",
    "blob.unknownext": b"\x00\x01",
    ".secret": b"dotfile",
    "big.bin": b"b" * 2048,
}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "public"
    for name, content in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (tmp_path / "outside.txt").write_bytes(b"private")
    (root / "escape.txt").symlink_to(tmp_path / "outside.txt")
    (root / "escape-dir").symlink_to(tmp_path)
    (root / "inside-link.css").symlink_to(root / "css" / "site.css")
    os.mkfifo(root / "pipe")
    return root


async def serve(
    nursery: trio.Nursery, root: Path, cache_control: str | None = "no-cache"
) -> RunningServer:
    router = Router()
    router.add(
        "GET",
        "/{path...}",
        StaticFiles(root, cache_control=cache_control, max_file_bytes=1024),
    )
    return await start_server(nursery, router)


async def raw_get(running: RunningServer, target: str) -> int:
    """GET with the target sent exactly as written (no client-side normalisation)."""
    async with await running.connect() as stream:
        head, _ = await H11Client(stream).request("GET", target)
    return head.status_code


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/index.html", "text/html; charset=utf-8"),
        ("/js/main.mjs", "text/javascript; charset=utf-8"),
        ("/js/legacy.js", "text/javascript; charset=utf-8"),
        ("/css/site.css", "text/css; charset=utf-8"),
        ("/img/logo.png", "image/png"),
        ("/img/icon.svg", "image/svg+xml"),
        ("/data/info.json", "application/json"),
        ("/blob.unknownext", "application/octet-stream"),
    ],
)
async def test_files_are_served_with_their_content_type(
    nursery: trio.Nursery, site: Path, path: str, content_type: str
) -> None:
    running = await serve(nursery, site)
    response = await http_request("GET", running.url + path)
    assert response.status == 200
    assert response.body == FILES[path.lstrip("/")]
    assert response.headers.get("content-type") == content_type
    assert response.headers.get("x-content-type-options") == "nosniff"
    assert response.headers.get("cache-control") == "no-cache"
    assert response.headers.get("etag")
    assert response.headers.get("last-modified", "").endswith(" GMT")


async def test_directories_serve_their_index(nursery: trio.Nursery, site: Path) -> None:
    running = await serve(nursery, site)
    root = await http_request("GET", running.url + "/")
    assert root.body == FILES["index.html"]
    assert root.headers.get("content-type") == "text/html; charset=utf-8"
    docs = await http_request("GET", running.url + "/docs/")
    assert docs.body == FILES["docs/index.html"]
    no_slash = await http_request("GET", running.url + "/docs")
    assert no_slash.body == FILES["docs/index.html"]
    no_index = await http_request("GET", running.url + "/js/")
    assert no_index.status == 404


async def test_etag_and_if_none_match_give_304(nursery: trio.Nursery, site: Path) -> None:
    running = await serve(nursery, site)
    url = running.url + "/css/site.css"
    first = await http_request("GET", url)
    etag = first.headers.get("etag")
    assert etag is not None
    again = await http_request("GET", url, headers=[("if-none-match", etag)])
    assert again.status == 304
    assert again.body == b""
    assert again.headers.get("etag") == etag
    assert again.headers.get("content-length") is None
    weak = await http_request("GET", url, headers=[("if-none-match", f'"other", W/{etag}')])
    assert weak.status == 304
    star = await http_request("GET", url, headers=[("if-none-match", "*")])
    assert star.status == 304
    changed = await http_request("GET", url, headers=[("if-none-match", '"stale"')])
    assert changed.status == 200


async def test_if_modified_since_gives_304(nursery: trio.Nursery, site: Path) -> None:
    running = await serve(nursery, site)
    url = running.url + "/css/site.css"
    first = await http_request("GET", url)
    last_modified = first.headers.get("last-modified")
    assert last_modified is not None
    same = await http_request("GET", url, headers=[("if-modified-since", last_modified)])
    assert same.status == 304
    old = await http_request(
        "GET", url, headers=[("if-modified-since", "Mon, 01 Jan 1990 00:00:00 GMT")]
    )
    assert old.status == 200
    garbage = await http_request("GET", url, headers=[("if-modified-since", "yesterday")])
    assert garbage.status == 200


@pytest.mark.parametrize(
    "since",
    [
        "Mon, 01 Jan 2024 00:00:00 +99999999999999999",  # an offset no C int holds
        "Mon, 01 Jan 2024 00:00:00 +2400",  # an offset of a day or more
        "Mon, 01 Jan 99999 00:00:00 GMT",  # a year datetime cannot hold
    ],
)
async def test_an_unreadable_if_modified_since_is_ignored(
    nursery: trio.Nursery, site: Path, since: str
) -> None:
    running = await serve(nursery, site)
    response = await http_request(
        "GET", running.url + "/css/site.css", headers=[("if-modified-since", since)]
    )
    assert response.status == 200
    assert response.body == FILES["css/site.css"]


async def test_an_if_modified_since_in_the_future_is_ignored(
    nursery: trio.Nursery, site: Path
) -> None:
    running = await serve(nursery, site)
    tomorrow = formatdate(time.time() + 24 * 3600, usegmt=True)
    response = await http_request(
        "GET", running.url + "/css/site.css", headers=[("if-modified-since", tomorrow)]
    )
    assert response.status == 200
    assert response.body == FILES["css/site.css"]


async def test_head_has_the_length_and_no_body(nursery: trio.Nursery, site: Path) -> None:
    running = await serve(nursery, site)
    response = await http_request("HEAD", running.url + "/js/main.mjs")
    assert response.status == 200
    assert response.body == b""
    assert response.headers.get("content-length") == str(len(FILES["js/main.mjs"]))


async def test_cache_control_is_configurable(nursery: trio.Nursery, site: Path) -> None:
    running = await serve(nursery, site, cache_control="public, max-age=3600")
    response = await http_request("GET", running.url + "/index.html")
    assert response.headers.get("cache-control") == "public, max-age=3600"


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/../outside.txt", 404),
        ("/js/../../outside.txt", 404),
        ("/%2e%2e/outside.txt", 404),
        ("/js/..%2F..%2Foutside.txt", 404),
        ("/..%5Coutside.txt", 404),
        ("//etc/passwd", 404),
        ("/escape.txt", 404),
        ("/escape-dir/outside.txt", 404),
        ("/.secret", 404),
        ("/js/.%2E/index.html", 404),
        ("/index.html%00.png", 400),
        ("/missing.html", 404),
        ("/pipe", 404),
        ("/big.bin", 500),
    ],
)
async def test_unsafe_or_unservable_paths_are_refused(
    nursery: trio.Nursery, site: Path, target: str, status: int
) -> None:
    running = await serve(nursery, site)
    assert await raw_get(running, target) == status


async def test_symlinks_inside_the_root_are_followed(nursery: trio.Nursery, site: Path) -> None:
    running = await serve(nursery, site)
    response = await http_request("GET", running.url + "/inside-link.css")
    assert response.status == 200
    assert response.body == FILES["css/site.css"]


async def test_other_methods_are_refused(nursery: trio.Nursery, site: Path) -> None:
    router = Router()
    router.add("POST", "/{path...}", StaticFiles(site))
    running = await start_server(nursery, router)
    response = await http_request("POST", running.url + "/index.html")
    assert response.status == 405


async def test_named_parameter_for_a_single_file_route(nursery: trio.Nursery, site: Path) -> None:
    router = Router()
    router.add("GET", "/image/{name}", StaticFiles(site / "img", param="name"))
    running = await start_server(nursery, router)
    response = await http_request("GET", running.url + "/image/logo.png")
    assert response.status == 200
    assert response.headers.get("content-type") == "image/png"


def test_content_types_are_pinned() -> None:
    assert content_type_for("a.MJS") == "text/javascript; charset=utf-8"
    assert content_type_for("noext") == "application/octet-stream"


@pytest.mark.parametrize(
    ("relative", "parts"),
    [
        ("", []),
        ("a/b.txt", ["a", "b.txt"]),
        ("dir/", ["dir"]),
        ("a//b", None),
        ("/abs", None),
        ("a/../b", None),
        (".hidden", None),
        ("a\\b", None),
    ],
)
def test_safe_parts(relative: str, parts: list[str] | None) -> None:
    assert safe_parts(relative) == parts


class RecordingWriter:
    """A BodyWriter that keeps what it is given, slice by slice."""

    def __init__(self) -> None:
        self.slices: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.slices.append(data)
        await trio.lowlevel.checkpoint()


async def test_a_large_file_is_streamed_in_slices_not_held_in_memory(tmp_path: Path) -> None:
    """Each GET of a large image used to hold the file (twice) until the client read it."""
    content = os.urandom(STREAM_ABOVE_BYTES * 3 + 17)
    (tmp_path / "large.png").write_bytes(content)
    files = StaticFiles(tmp_path, max_file_bytes=len(content))
    request = Request("GET", "/large.png", "/large.png", {}, Headers(), b"", "test:1")
    response = await files(dataclasses.replace(request, path_params={"path": "large.png"}))
    assert isinstance(response, StreamingResponse)
    assert response.content_length == len(content)
    writer = RecordingWriter()
    await response.stream(writer)
    assert max(len(s) for s in writer.slices) <= SLICE_BYTES
    assert b"".join(writer.slices) == content


async def test_a_large_file_over_a_real_connection(nursery: trio.Nursery, tmp_path: Path) -> None:
    content = os.urandom(STREAM_ABOVE_BYTES * 5)
    (tmp_path / "large.png").write_bytes(content)
    router = Router()
    router.add("GET", "/{path...}", StaticFiles(tmp_path, max_file_bytes=len(content)))
    running = await start_server(nursery, router)
    response = await http_request("GET", running.url + "/large.png", timeout=10)
    head = await http_request("HEAD", running.url + "/large.png", timeout=10)
    assert response.status == 200
    assert response.body == content
    assert response.headers.get("content-length") == str(len(content))
    assert head.status == 200
    assert head.headers.get("content-length") == str(len(content))
    assert head.body == b""
