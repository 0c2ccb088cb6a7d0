"""The banner's live preview in Chromium, against the real daemon and its simulator.

`make run`'s embedded simulator sends a JPEG preview per sampler step, so the
banner's thumbnail changes while the image forms; then the finished image lands
in the carousel. Every wait is on a DOM state, never a sleep.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route, expect

from daemon.simulator.jpeg import encode_jpeg
from daemon.simulator.values import Pattern
from tests.web.browser import ARTIFACTS, RecordedPage
from tests.web.daemon_process import DaemonProcess, running_daemon

STEP_TIME = 0.2  # 20 steps: about 4 s of previews
SCREENSHOT = ARTIFACTS / "banner-live-preview.png"

# Records every src the thumbnail shows, with its box and whether it was decoded.
WATCH_THUMBNAIL = """() => {
  window.__previews = [];
  const record = (img) => {
    const box = img.getBoundingClientRect();
    window.__previews.push({
      src: img.getAttribute("src"), alt: img.alt, width: box.width, height: box.height,
      loaded: img.complete && img.naturalWidth > 0,
    });
  };
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === "attributes" && m.target.matches?.(".preview-thumbnail")) record(m.target);
      for (const node of m.addedNodes ?? []) {
        if (node.nodeType !== 1) continue;
        const thumb = ".preview-thumbnail";
        const img = node.matches(thumb) ? node : node.querySelector(thumb);
        if (img) record(img);
      }
    }
  }).observe(document.body, {
    subtree: true, childList: true, attributes: true, attributeFilter: ["src"],
  });
}"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    data_dir: Path = tmp_path_factory.mktemp("daemon-data")
    with running_daemon(data_dir, f"simulator_step_time={STEP_TIME}") as daemon:
        yield daemon


def test_the_banner_thumbnail_follows_the_previews_then_the_image_lands(
    web: RecordedPage, daemon: DaemonProcess
) -> None:
    page: Page = web.page
    page.goto(f"{daemon.url}/")
    page.evaluate(WATCH_THUMBNAIL)
    page.get_by_label("Prompt").fill("a harbour in fog")
    page.get_by_label("Name").fill("Harbour")
    page.get_by_role("button", name="Generate").click()

    banner = page.locator(".progress-banner")
    expect(banner).to_have_count(1)
    thumbnail = banner.locator("img.preview-thumbnail")
    expect(thumbnail).to_have_attribute("alt", "Live preview of Harbour")
    page.wait_for_function("() => new Set(window.__previews.map(p => p.src)).size >= 2")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    page.wait_for_function("() => new Set(window.__previews.map(p => p.src)).size >= 3")

    image = page.locator("img.carousel__image")
    expect(image).to_have_attribute("src", re.compile(r"^image/[^/]+$"))
    page.wait_for_function(
        "() => { const img = document.querySelector('img.carousel__image');"
        " return img !== null && img.complete && img.naturalWidth > 0; }"
    )
    expect(banner).to_have_count(0)

    shown = page.evaluate("() => window.__previews")
    sources = [p["src"] for p in shown]
    assert len(set(sources)) >= 3
    task_id = sources[0].split("/")[1]
    assert all(s.startswith(f"tasks/{task_id}/preview?v=") for s in sources)  # page-relative
    versions = [int(s.rsplit("=", 1)[1]) for s in sources]
    assert versions == sorted(versions)
    # Swapped in only once loaded, and always in the same box: no flicker, no jump.
    assert all(p["loaded"] for p in shown), shown
    assert {(p["width"], p["height"]) for p in shown} == {(48, 48)}
    fetched = [u for u in web.requests if f"/tasks/{task_id}/preview" in u]
    assert fetched, "the thumbnail's images came from GET /tasks/{id}/preview"


def test_the_simulators_jpeg_previews_decode_to_the_colours_drawn(web: RecordedPage) -> None:
    width, height = 64, 40
    rows = Pattern(color=0x336699, seed=5).rows(width, height)
    url = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(width, height, rows)).decode()
    decoded = web.page.evaluate(
        """async (url) => {
          const img = new Image(); img.src = url; await img.decode();
          const canvas = document.createElement("canvas");
          canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
          const g = canvas.getContext("2d"); g.drawImage(img, 0, 0);
          return [img.naturalWidth, img.naturalHeight,
                  Array.from(g.getImageData(0, 0, canvas.width, canvas.height).data)];
        }""",
        url,
    )
    assert decoded[:2] == [width, height]
    pixels = decoded[2]
    for y in range(4, height, 8):  # each 8x8 block is the colour at its centre
        for x in range(4, width, 8):
            got = pixels[(y * width + x) * 4 : (y * width + x) * 4 + 3]
            want = rows[y][3 * x : 3 * x + 3]
            assert all(abs(g - w) <= 2 for g, w in zip(got, want, strict=True)), (x, y)


@pytest.fixture
def stepped_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of its own whose simulator moves one sampler step when told."""
    with running_daemon(tmp_path, "simulator_step_time=0.01") as daemon:
        daemon.sim_control(manual_steps=True)
        yield daemon


def test_previews_that_arrive_faster_than_they_load_still_show(
    web: RecordedPage, stepped_daemon: DaemonProcess
) -> None:
    # Each new preview URL abandoned the load under way: on a link where a
    # preview takes longer to load than the next one takes to come (4 a second
    # by default), the thumbnail showed nothing for the whole run.
    page: Page = web.page
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)  # answered when the test says

    page.route(lambda url: "/preview?v=" in url, hold)
    page.goto(f"{stepped_daemon.url}/")
    page.get_by_label("Prompt").fill("a slow link")
    page.get_by_role("button", name="Generate").click()
    thumbnail = page.locator(".progress-banner img.preview-thumbnail")

    def next_preview() -> str:
        with page.expect_request(lambda r: "/preview?v=" in r.url) as asked:
            stepped_daemon.sim_control(grant_steps=1)
        return asked.value.url

    first = next_preview()
    second = next_preview()  # asked for while the first is still on its way
    assert second != first
    held[0].continue_()
    expect(thumbnail).to_have_attribute("src", first.split("/", 3)[3])
    expect(page.locator(".progress-banner")).to_have_attribute("data-status", "running")
    held[1].continue_()
    expect(thumbnail).to_have_attribute("src", second.split("/", 3)[3])
