"""The page against the real daemon and its embedded ComfyUI simulator, in Chromium.

One daemon serves the whole module (start-up is the slow part); each test
leaves the simulator's fault knobs as it found them. Sampler steps are slowed
down so the banner can be seen mid-way; every wait is on a DOM state, never a
sleep.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.web.browser import ARTIFACTS, RecordedPage
from tests.web.daemon_process import DaemonProcess, running_daemon

# Seconds per simulated sampler step: 20 steps take about 4 s, long enough to
# catch the bar mid-way, short enough for CI.
STEP_TIME = 0.2
SCREENSHOT = ARTIFACTS / "banner-mid-progress.png"
PERCENT_1_TO_99 = re.compile(r"^([1-9]|[1-9][0-9])%$")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    data_dir: Path = tmp_path_factory.mktemp("daemon-data")
    with running_daemon(data_dir, f"simulator_step_time={STEP_TIME}") as daemon:
        yield daemon


@pytest.fixture
def page(web: RecordedPage, daemon: DaemonProcess) -> Iterator[Page]:
    web.page.goto(f"{daemon.url}/")
    yield web.page
    # Whatever the test did, the page talked to the daemon and nothing else.
    outside = [url for url in web.requests if not url.startswith(f"{daemon.url}/")]
    assert outside == [], "requests that left the daemon's origin"


def generate(page: Page, prompt: str, *, name: str = "", seed: str = "") -> None:
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Seed").fill(seed)
    page.get_by_label("Name").fill(name)
    page.get_by_role("button", name="Generate").click()


def test_generate_shows_live_progress_then_the_image(
    page: Page, web: RecordedPage, daemon: DaemonProcess
) -> None:
    generate(page, "a lighthouse at dusk", name="Lighthouse", seed="1234")

    banner = page.locator(".progress-banner")
    expect(banner).to_have_count(1)
    # Mid-progress: the sampler is running, a few steps done, so there is a rate.
    expect(banner.locator(".progress-banner__step")).to_have_text("Sampling image...")
    expect(banner.locator(".progress-banner__counter")).to_have_text(
        re.compile(r"^([3-9]|1[0-7])/20$")
    )
    expect(banner.locator(".progress-banner__details")).to_have_text(
        re.compile(r"^about \d+ s left$")
    )
    percent = banner.locator(".progress-banner__percent")
    expect(percent).to_have_text(PERCENT_1_TO_99)
    # Text and bar read in one go: an update cannot land between the two reads.
    shown = banner.evaluate(
        "el => [el.querySelector('.progress-banner__percent').textContent,"
        " el.querySelector('.progress-banner__fill').style.width]"
    )
    seen = int(shown[0].rstrip("%"))
    assert shown[1] == f"{seen}%"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))

    # The percentage rises while the task runs (or the bar fills on completion).
    page.wait_for_function(
        "seen => parseInt(document.querySelector('.progress-banner__percent')"
        "?.textContent ?? '-1') > seen",
        arg=seen,
    )

    image = page.locator("img.carousel__image")
    expect(image).to_have_attribute("src", re.compile(r"^image/[^/]+$"))
    page.wait_for_function(
        "() => { const img = document.querySelector('img.carousel__image');"
        " return img !== null && img.complete && img.naturalWidth > 0; }"
    )
    expect(page.locator(".carousel__title")).to_have_text("Lighthouse")
    expect(page.locator(".carousel__seed")).to_have_text("seed 1234")
    expect(page.locator(".toast--success .toast__text")).to_have_text("Image ready: Lighthouse")
    expect(banner).to_have_count(0)

    assert f"{daemon.url}/generate" in web.requests
    streams = [u for u in web.requests if u.startswith(f"{daemon.url}/progress/")]
    assert len(streams) == 1, f"one stream for one task, got {streams}"
    assert any(u.startswith(f"{daemon.url}/vendor/preact/") for u in web.requests)


def test_a_failing_node_shows_the_daemons_error(page: Page, daemon: DaemonProcess) -> None:
    daemon.sim_control(fail_at="KSampler")
    try:
        generate(page, "a broken generator")
        banner = page.locator(".progress-banner")
        expect(banner).to_have_attribute("data-status", "error")
        task_id = banner.get_attribute("data-task-id")
        status, snapshot = daemon.request("GET", f"{daemon.url}/tasks/{task_id}")
        assert status == 200
        assert snapshot["status"] == "error"
        message = snapshot["error"]["message"]
        assert "simulated failure" in message
        expect(banner.get_by_role("alert")).to_have_text(message)
        expect(page.locator("img.carousel__image")).to_have_count(0)
    finally:
        daemon.sim_control(fail_at=None)


def test_a_refused_request_shows_the_daemons_message(page: Page, daemon: DaemonProcess) -> None:
    status, body = daemon.request(
        "POST", f"{daemon.url}/generate", {"prompt": "p", "workflow": "txt2img", "seed": "abc"}
    )
    assert status == 400
    generate(page, "p", seed="abc")
    expect(page.locator(".toast--error .toast__text")).to_have_text(body["error"]["message"])
    expect(page.locator(".progress-banner")).to_have_count(0)


def test_cancel_ends_the_task_with_the_daemons_message(page: Page, daemon: DaemonProcess) -> None:
    generate(page, "a lighthouse, to be cancelled")
    banner = page.locator(".progress-banner")
    expect(banner.locator(".progress-banner__step")).to_have_text("Sampling image...")
    banner.get_by_role("button", name="Cancel").click()
    expect(banner).to_have_attribute("data-status", "error")
    task_id = banner.get_attribute("data-task-id")
    _, snapshot = daemon.request("GET", f"{daemon.url}/tasks/{task_id}")
    assert snapshot["error"]["code"] == "cancelled"
    expect(banner.get_by_role("alert")).to_have_text(snapshot["error"]["message"])


def test_two_generations_run_side_by_side(page: Page) -> None:
    generate(page, "first picture", name="First")
    expect(page.locator(".progress-banner")).to_have_count(1)
    generate(page, "second picture", name="Second")
    # Both banners at once, stacked; then both images land and both banners go.
    expect(page.locator(".progress-banner")).to_have_count(2)
    expect(page.locator(".carousel__thumbs li")).to_have_count(2, timeout=40_000)
    expect(page.locator(".progress-banner")).to_have_count(0)
    # Newest first; the carousel steps back to the older one.
    expect(page.locator(".carousel__count")).to_have_text("1 / 2")
    expect(page.locator(".carousel__title")).to_have_text("Second")
    page.get_by_role("button", name="Older").click()
    expect(page.locator(".carousel__count")).to_have_text("2 / 2")
    expect(page.locator(".carousel__title")).to_have_text("First")
