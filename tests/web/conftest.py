"""Fixtures for the browser tests: one Chromium per session, a fresh page per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Playwright, expect, sync_playwright

from tests.web.browser import DEFAULT_TIMEOUT_MS, RecordedPage, launch_chromium, recorded_page

expect.set_options(timeout=DEFAULT_TIMEOUT_MS)


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = launch_chromium(playwright)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def web(browser: Browser) -> Iterator[RecordedPage]:
    """A recorded page; the test fails if the page threw a script error."""
    with recorded_page(browser) as recorded:
        yield recorded
        assert recorded.errors == [], "script errors on the page"
