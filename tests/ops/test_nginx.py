"""A real nginx (Debian's binary) in front of the real daemon, with the shipped site file.

The site file is used as shipped except for the upstream port, the listen line
and proxy_read_timeout (tests.ops.harness.render_site). The surrounding
nginx.conf turns gzip on for event streams and makes nginx ignore the daemon's
`X-Accel-Buffering: no`, so what keeps SSE unbuffered is the site file alone.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import trio

from daemon.http.client import BodyChunks, http_request, open_stream
from protocol.sse import ServerSentEvent, SSEDecoder
from tests.ops.harness import (
    DaemonProcess,
    NginxProcess,
    follow,
    generate,
    payload,
    run_nginx,
    running_daemon,
)

SUB_PATH = "/comfy/"
STEPS = 20  # the default workflow's sampler steps
UNBUFFERED_WAIT = 10.0  # an event held back by a buffer would never come: fail after this
SHORT_READ_TIMEOUT = 1.0  # proxy_read_timeout in the heartbeat tests (s)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def start_nginx(
    nursery: trio.Nursery, tmp_path: Path, daemon: DaemonProcess, read_timeout: str = "90s"
) -> NginxProcess:
    nginx: NginxProcess = await nursery.start(
        run_nginx, tmp_path, port_of(daemon.url), read_timeout
    )
    return nginx


# ---------------------------------------------------------------- the page and the API


IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(?\s*)["']([^"'\s]+)["']""")
HTML_URL = re.compile(r"""\b(?:src|href)="([^"]+)\"""")


def page_urls(page_url: str, html: str) -> tuple[list[str], dict[str, str]]:
    """The URLs the page loads itself, and its import map, all resolved against it."""
    urls = [
        urllib.parse.urljoin(page_url, ref)
        for ref in HTML_URL.findall(html)
        if not ref.startswith(("data:", "http:", "https:"))
    ]
    found = re.search(r'<script type="importmap">(.*?)</script>', html, re.DOTALL)
    assert found, "the page has no import map"
    imports = json.loads(found.group(1))["imports"]
    import_map = {name: urllib.parse.urljoin(page_url, ref) for name, ref in imports.items()}
    return urls, import_map


async def test_the_page_and_its_api_work_under_the_sub_path(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with running_daemon(
        tmp_path, "--simulate", "--set", "simulator_step_time=0.01"
    ) as daemon:
        nginx = await start_nginx(nursery, tmp_path, daemon)
        base = nginx.url + SUB_PATH

        # /comfy (no slash) redirects: the page's relative links need the slash.
        redirect = await http_request("GET", nginx.url + "/comfy", timeout=10)
        assert redirect.status == 301
        assert (redirect.headers.get("location") or "").endswith("/comfy/")

        page = await http_request("GET", base, timeout=10)
        assert page.status == 200, nginx.error_log()
        assert (page.headers.get("content-type") or "").startswith("text/html")
        urls, import_map = page_urls(base, page.text())

        # Every file the page loads, and every module those import, comes
        # through nginx under /comfy/ (relative URLs, import-map names).
        seen: set[str] = set()
        pending = [*urls, *import_map.values()]
        while pending:
            url = pending.pop()
            if url in seen:
                continue
            seen.add(url)
            assert urllib.parse.urlsplit(url).path.startswith(SUB_PATH), url
            response = await http_request("GET", url, timeout=10)
            assert response.status == 200, f"{url}: {response.status}"
            if url.endswith((".mjs", ".js")):
                for specifier in IMPORT.findall(response.text()):
                    if specifier.startswith(("./", "../", "/")):
                        pending.append(urllib.parse.urljoin(url, specifier))
                    else:
                        assert specifier in import_map, f"{url} imports {specifier!r}"
        assert any(u.endswith("/js/main.mjs") for u in seen)
        assert any("/vendor/preact/" in u for u in seen)

        # The API at the same relative URLs the page uses: generate,
        # progress/<id>, tasks/<id>, and the image relative to the page.
        reply = await generate(base.rstrip("/"))
        task_id = reply["taskId"]
        events, complete = await follow(f"{base}progress/{task_id}")
        assert complete
        assert events[-1].event == "complete", events
        snapshot = await http_request("GET", f"{base}tasks/{task_id}", timeout=10)
        assert snapshot.status == 200
        assert snapshot.json()["status"] == "completed"
        image_url = payload(events[-1])["result"]["imageUrl"]
        image = await http_request("GET", base + image_url.lstrip("/"), timeout=10)
        assert image.status == 200
        assert image.body.startswith(b"\x89PNG\r\n\x1a\n")


async def test_the_page_s_own_origin_is_recognised_through_the_proxy(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # The daemon knows its own page by comparing Origin with the Host the
    # proxy passes on: the site must pass the port too (nginx listens on an
    # arbitrary one here).
    async with running_daemon(
        tmp_path, "--simulate", "--set", "simulator_step_time=0.01"
    ) as daemon:
        nginx = await start_nginx(nursery, tmp_path, daemon)
        base = nginx.url + SUB_PATH
        body = json.dumps({"prompt": "a fox behind nginx"}).encode()
        for origin, status in (
            (nginx.url, 202),
            (f"http://127.0.0.1:{port_of(daemon.url)}", 403),  # the daemon's, not the page's
            ("http://evil.example", 403),
        ):
            answer = await http_request(
                "POST",
                f"{base}generate",
                headers=[("Content-Type", "application/json"), ("Origin", origin)],
                body=body,
                timeout=10,
            )
            assert answer.status == status, (origin, answer.body)
        task_id = (await generate(base.rstrip("/")))["taskId"]
        for origin, status in ((nginx.url, 200), ("http://evil.example", 403)):
            read = await http_request(
                "GET", f"{base}tasks/{task_id}", headers=[("Origin", origin)], timeout=10
            )
            assert read.status == status, origin


# ---------------------------------------------------------------- SSE through nginx


class EventReader:
    """One SSE response read chunk by chunk: events, and heartbeat comments counted."""

    def __init__(self, chunks: BodyChunks) -> None:
        self.chunks = chunks
        self.decoder = SSEDecoder()
        self.pending: list[ServerSentEvent] = []
        self.heartbeats = 0
        self.ended = False

    async def next_chunk(self) -> bool:
        try:
            chunk: bytes = await anext(self.chunks)
        except StopAsyncIteration:
            self.ended = True
            return False
        self.heartbeats += chunk.count(b": heartbeat\n")
        self.pending.extend(self.decoder.feed(chunk))
        return True

    async def next_event(self) -> ServerSentEvent | None:
        while not self.pending:
            if not await self.next_chunk():
                return None
        return self.pending.pop(0)


def step_of(event: ServerSentEvent) -> int:
    value = payload(event).get("progress", {}).get("currentValue")
    return int(value) if isinstance(value, int) else -1


async def test_sse_events_arrive_one_by_one_unbuffered(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with running_daemon(tmp_path, "--simulate") as daemon:
        nginx = await start_nginx(nursery, tmp_path, daemon)
        base = nginx.url + SUB_PATH
        # The simulator runs a sampler step only when the test grants it.
        await daemon.sim_control(manual_steps=True)
        task_id = (await generate(base.rstrip("/")))["taskId"]
        headers = [("Accept", "text/event-stream"), ("Accept-Encoding", "gzip")]
        async with open_stream("GET", f"{base}progress/{task_id}", headers=headers) as response:
            assert response.status == 200
            assert (response.headers.get("content-type") or "").startswith("text/event-stream")
            assert response.headers.get("content-encoding") is None  # gzip off for SSE
            reader = EventReader(response.chunks)
            # Step by step: the event for step k must arrive while the task
            # waits for step k+1, i.e. before anything else could push it out.
            for step in range(1, 4):
                await daemon.sim_control(grant_steps=1)
                with trio.move_on_after(UNBUFFERED_WAIT) as waited:
                    while (event := await reader.next_event()) is not None:
                        assert event.event == "progress", event
                        if step_of(event) == step:
                            break
                assert not waited.cancelled_caught, f"step {step}'s event is held back by nginx"
                assert not reader.ended
            await daemon.sim_control(grant_steps=1000)
            last = None
            while (event := await reader.next_event()) is not None:
                last = event
            assert last is not None
            assert last.event == "complete"
            assert response.chunks.complete


async def test_heartbeats_keep_a_quiet_stream_open_past_proxy_read_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    heartbeat = SHORT_READ_TIMEOUT / 4
    async with running_daemon(
        tmp_path, "--simulate", "--set", f"heartbeat_interval={heartbeat}"
    ) as daemon:
        nginx = await start_nginx(nursery, tmp_path, daemon, f"{SHORT_READ_TIMEOUT:g}s")
        base = nginx.url + SUB_PATH
        await daemon.sim_control(manual_steps=True)
        task_id = (await generate(base.rstrip("/")))["taskId"]
        async with open_stream("GET", f"{base}progress/{task_id}") as response:
            reader = EventReader(response.chunks)
            # Let the sampler take one step; after its event the task waits
            # for the next: no more events, only heartbeats.
            await daemon.sim_control(grant_steps=1)
            while (event := await reader.next_event()) is not None and step_of(event) != 1:
                pass
            assert event is not None
            opened, heartbeats = trio.current_time(), reader.heartbeats
            # Read heartbeats until the stream has been quiet for 3x nginx's
            # read timeout; it must still be open.
            while trio.current_time() - opened < 3 * SHORT_READ_TIMEOUT:
                assert await reader.next_chunk(), f"nginx cut the stream:\n{nginx.error_log()}"
                assert not reader.pending, "only heartbeats while the task waits"
            assert reader.heartbeats - heartbeats >= 6
            # ... and the same stream still delivers the end of the task.
            await daemon.sim_control(grant_steps=1000)
            last = None
            while (event := await reader.next_event()) is not None:
                last = event
            assert last is not None
            assert last.event == "complete"
            assert response.chunks.complete


async def test_without_heartbeats_nginx_cuts_a_quiet_stream(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # The control for the test above: the same quiet stream with the heartbeat
    # far away is ended by nginx after proxy_read_timeout, unfinished.
    async with running_daemon(tmp_path, "--simulate", "--set", "heartbeat_interval=3600") as daemon:
        nginx = await start_nginx(nursery, tmp_path, daemon, f"{SHORT_READ_TIMEOUT:g}s")
        base = nginx.url + SUB_PATH
        await daemon.sim_control(manual_steps=True)
        task_id = (await generate(base.rstrip("/")))["taskId"]
        opened = trio.current_time()
        events, complete = await follow(f"{base}progress/{task_id}")
        assert trio.current_time() - opened >= SHORT_READ_TIMEOUT * 0.9
        assert not complete  # cut off: no end of the chunked body
        assert {event.event for event in events} == {"progress"}  # never the end
        assert "upstream timed out" in nginx.error_log()
