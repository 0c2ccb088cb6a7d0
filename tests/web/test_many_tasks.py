"""Many generations at once in one page, in Chromium against the real daemon.

The simulator runs in manual-step mode, so every task stays queued or
running until the test lets the steps go: nothing ends while the test looks.
Every wait is on a DOM state, never a sleep.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.web.browser import RecordedPage
from tests.web.daemon_process import DaemonProcess, running_daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    # One daemon per test: each leaves tasks behind that would queue ahead of the next.
    with running_daemon(tmp_path, "simulator_step_time=0.01") as daemon:
        daemon.sim_control(manual_steps=True)
        yield daemon


@pytest.fixture
def page(web: RecordedPage, daemon: DaemonProcess) -> Page:
    web.page.goto(f"{daemon.url}/")
    return web.page


def generate(page: Page, prompt: str) -> None:
    page.get_by_label("Prompt").fill(prompt)
    # A real click: Playwright refuses it when something covers the button.
    page.get_by_role("button", name="Generate").click()


def test_a_stack_of_banners_never_covers_the_form(page: Page) -> None:
    # The stack was fixed over the page: from the fifth banner on it covered
    # the Generate button, so a sixth generation could not be started.
    banners = page.locator(".progress-banner")
    for n in range(1, 7):
        generate(page, f"picture {n}")
        expect(banners).to_have_count(n)
    # The newest banner is within reach too (the stack scrolls within itself).
    with page.expect_response(lambda r: r.request.method == "DELETE") as cancelled:
        banners.last.get_by_role("button", name="Cancel").click()
    assert cancelled.value.status == 202
    # Scrolled down, the stack still sits at the top of the window.
    page.set_viewport_size({"width": 1100, "height": 500})
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_function("window.scrollY > 0")
    box = page.locator(".banner-stack").bounding_box()
    assert box is not None
    assert box["y"] == 0


def test_past_six_tasks_the_page_can_still_generate_and_cancel(
    page: Page, web: RecordedPage, daemon: DaemonProcess
) -> None:
    # Over HTTP/1.1 Chromium holds at most 6 connections to the daemon. With
    # an EventSource per task, the seventh POST /generate (and any Cancel, any
    # image) waited until some task ended.
    banners = page.locator(".progress-banner")
    for n in range(1, 9):
        page.get_by_label("Prompt").fill(f"picture {n}")
        page.get_by_label("Name").press("Enter")  # submits the form, wherever the button is
        expect(banners).to_have_count(n)
    streams = [u for u in web.requests if u.startswith(f"{daemon.url}/progress/")]
    assert len(streams) == 4, "4 streams at once, 2 connections left for the rest"
    # A banner waiting for a stream shows its task as GET /tasks says, not "Starting...".
    expect(banners.nth(7)).to_contain_text("ahead of you in the queue")

    with page.expect_response(lambda r: r.request.method == "DELETE") as cancelled:
        banners.nth(1).get_by_role("button", name="Cancel").click()
    assert cancelled.value.status == 202
    expect(banners.nth(1)).to_have_attribute("data-status", "error")

    # The tasks that waited for a stream still follow theirs to the image.
    daemon.sim_control(manual_steps=False)
    expect(page.locator(".carousel__thumbs li")).to_have_count(7)
    expect(banners).to_have_count(1)  # the cancelled one, until dismissed
