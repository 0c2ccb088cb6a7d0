"""Several tabs of the page at once, in Chromium against the real daemon.

The tabs of one browser share its 6 connections per site (HTTP/1.1): the
stream budget is the browser's, not each tab's. The simulator runs in
manual-step mode, so no task ends while the test looks.
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
    with running_daemon(tmp_path, "simulator_step_time=0.01") as daemon:
        daemon.sim_control(manual_steps=True)
        yield daemon


def generate(page: Page, prompt: str) -> None:
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Name").press("Enter")  # submits the form, wherever the button is


def test_two_tabs_following_tasks_can_still_generate_and_cancel(
    web: RecordedPage, daemon: DaemonProcess
) -> None:
    # Each tab kept up to 4 streams open: two tabs following 3 tasks each
    # held all 6 connections, and the next POST /generate (or Cancel) in
    # either tab waited until some task ended.
    first = web.page
    second = first.context.new_page()
    streams: list[str] = []
    for tab in (first, second):
        tab.on("request", lambda r: streams.append(r.url) if "/progress/" in r.url else None)
        tab.goto(f"{daemon.url}/")
    for tab in (first, second):
        for n in range(1, 4):
            generate(tab, f"picture {n}")
            expect(tab.locator(".progress-banner")).to_have_count(n)

    generate(second, "one more")
    expect(second.locator(".progress-banner")).to_have_count(4)
    with first.expect_response(lambda r: r.request.method == "DELETE") as cancelled:
        first.locator(".progress-banner").nth(0).get_by_role("button", name="Cancel").click()
    assert cancelled.value.status == 202
    assert len(streams) <= 5, "4 streams among the tabs, 1 more after the cancel"

    # Every task still follows its stream to the image.
    daemon.sim_control(manual_steps=False)
    expect(first.locator(".carousel__thumbs li")).to_have_count(2)
    expect(second.locator(".carousel__thumbs li")).to_have_count(4)
