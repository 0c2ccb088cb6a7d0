"""The system's Chromium under Playwright, and a page that records what it does.

Only Debian's /usr/bin/chromium is used (CI's .ci/run installs it); Playwright's
own browser downloads are never used, so the tests also run offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # we run as root in CI; Chromium's sandbox refuses root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No traffic of the browser's own (updates, sync, safe browsing) in a test run.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Generous for CI's two shared cores; every wait ends as soon as its condition holds.
DEFAULT_TIMEOUT_MS = 20_000

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True
    )


@dataclass
class RecordedPage:
    """A page plus every request URL it made and every script error it hit."""

    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def _on_request(self, request: Request) -> None:
        self.requests.append(request.url)

    def _on_console(self, message: ConsoleMessage) -> None:
        # Failed loads are logged as console errors too; tests that provoke
        # them (503, 404) check requests instead. Uncaught exceptions come
        # through `pageerror`.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")

    def _on_page_error(self, error: Exception) -> None:
        self.errors.append(f"pageerror: {error}")


@contextmanager
def recorded_page(browser: Browser) -> Iterator[RecordedPage]:
    """A fresh context (no shared cache or cookies) with one recorded page."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(DEFAULT_TIMEOUT_MS)
        recorded = RecordedPage(page)
        page.on("request", recorded._on_request)
        page.on("console", recorded._on_console)
        page.on("pageerror", recorded._on_page_error)
        yield recorded
    finally:
        context.close()
