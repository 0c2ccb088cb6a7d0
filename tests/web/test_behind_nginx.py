"""The page in Chromium through nginx under /comfy/, with the shipped site file.

The daemon (with its simulator) behind the nginx of tests/ops (the site file
systemd/nginx-comfy-progress.conf as shipped, but for its ports): the page
loads at /comfy/, and everything it fetches - modules, Preact, the POST, the
event stream, the image - stays under /comfy/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.ops.harness import NginxProcess, nginx_process
from tests.web.browser import RecordedPage
from tests.web.daemon_process import running_daemon


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProcess]:
    data_dir = tmp_path_factory.mktemp("daemon-data")
    with running_daemon(data_dir, "simulator_step_time=0.02") as daemon:
        port = int(daemon.url.rsplit(":", 1)[1])
        with nginx_process(tmp_path_factory.mktemp("nginx"), port) as nginx:
            yield nginx


def test_the_page_works_under_the_sub_path(web: RecordedPage, nginx: NginxProcess) -> None:
    base = f"{nginx.url}/comfy/"
    page: Page = web.page
    page.goto(base)
    page.get_by_label("Prompt").fill("a fox behind a proxy")
    page.get_by_label("Name").fill("Proxied")
    page.get_by_role("button", name="Generate").click()

    image = page.locator("img.carousel__image")
    expect(image).to_have_attribute("src", re.compile(r"^image/[^/]+$"))
    page.wait_for_function(
        "() => { const img = document.querySelector('img.carousel__image');"
        " return img !== null && img.complete && img.naturalWidth > 0; }"
    )
    expect(page.locator(".carousel__title")).to_have_text("Proxied")
    expect(page.locator(".progress-banner")).to_have_count(0)

    outside = [url for url in web.requests if not url.startswith(base)]
    assert outside == [], "requests that left /comfy/"
    assert f"{base}generate" in web.requests
    assert any(url.startswith(f"{base}progress/") for url in web.requests)
    assert any(url.startswith(f"{base}vendor/preact/") for url in web.requests)
    assert any(url.startswith(f"{base}image/") for url in web.requests)
