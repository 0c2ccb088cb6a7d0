"""Pages from other origins, and the API token prompt, in Chromium against the real daemon.

Two small HTTP servers of the test's own, on other ports of 127.0.0.1, serve
a blank page each: one origin is in the daemon's `allowed_origins`, the other
is not. The page scripts talk to the daemon with the browser's own `fetch`
and `EventSource`. What the daemon did about each request is read from its
side too (its log lines and its /metrics), not only from what the browser let
the page see.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.web.browser import RecordedPage, recorded_page
from tests.web.daemon_process import DaemonProcess, running_daemon

TOKEN = "web-test-token-0123456789abcdef"

FOLLOW_A_TASK = """
async (daemon) => {
  const answer = await fetch(`${daemon}/generate`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": "from-another-origin" },
    body: JSON.stringify({ prompt: "a fox from another origin" }),
  });
  const reply = await answer.json();
  const stream = await new Promise((resolve, reject) => {
    const events = [];
    const source = new EventSource(`${daemon}/progress/${reply.taskId}`);
    const take = (event) => {
      events.push(event.type);
      if (event.type !== "progress") {
        source.close();
        resolve({ events, last: JSON.parse(event.data) });
      }
    };
    for (const name of ["progress", "complete", "error-event"]) source.addEventListener(name, take);
    source.onerror = () => {
      source.close();
      reject(new Error(`the stream failed after ${events.length} events`));
    };
  });
  return { status: answer.status, location: answer.headers.get("Location"), reply, ...stream };
}
"""

TRY_FROM_AN_UNLISTED_ORIGIN = """
async ({ daemon, taskId }) => {
  const result = {};
  try {
    await fetch(`${daemon}/generate`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: "not from here" }),
    });
    result.json = "answered";
  } catch (error) {
    result.json = "blocked";
  }
  // A "simple" request: the browser sends it without asking first.
  const blind = await fetch(`${daemon}/generate`, {
    method: "POST",
    mode: "no-cors",
    headers: { "Content-Type": "text/plain" },
    body: JSON.stringify({ prompt: "a forged request" }),
  });
  result.blind = blind.type;
  result.stream = await new Promise((resolve) => {
    const source = new EventSource(`${daemon}/progress/${taskId}`);
    source.addEventListener("complete", () => {
      source.close();
      resolve("read");
    });
    source.onerror = () => {
      source.close();
      resolve("failed");
    };
  });
  return result;
}
"""


class BlankPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another app</title><p>another app</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet


@pytest.fixture(scope="module")
def other_origins() -> Iterator[tuple[str, str]]:
    """Two page servers on 127.0.0.1: (listed origin, unlisted origin)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), BlankPage) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        listed, unlisted = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
        yield listed, unlisted
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, other_origins: tuple[str, str]
) -> Iterator[DaemonProcess]:
    listed, _ = other_origins
    data_dir: Path = tmp_path_factory.mktemp("daemon-data")
    with running_daemon(
        data_dir, "simulator_step_time=0.02", f"allowed_origins={listed}"
    ) as daemon:
        yield daemon


def metric(daemon: DaemonProcess, sample: str) -> float:
    """One sample of the daemon's /metrics (name and labels as exposed)."""
    with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


REFUSED = 'comfy_progress_http_rejected_total{status="403"}'
ACCEPTED = 'comfy_progress_http_requests_total{method="POST",route="/generate",status="202"}'


def test_a_listed_origin_can_generate_and_follow_the_stream(
    web: RecordedPage, daemon: DaemonProcess, other_origins: tuple[str, str]
) -> None:
    listed, _ = other_origins
    web.page.goto(f"{listed}/")
    result = web.page.evaluate(FOLLOW_A_TASK, daemon.url)
    assert result["status"] == 202
    assert result["events"][0] == "progress"
    assert result["events"][-1] == "complete"
    assert result["last"]["status"] == "completed"
    assert result["last"]["result"]["prompt"] == "a fox from another origin"


def test_an_unlisted_origin_is_refused_by_the_daemon(
    browser: Browser, daemon: DaemonProcess, other_origins: tuple[str, str]
) -> None:
    _, unlisted = other_origins
    status, reply = daemon.request("POST", f"{daemon.url}/generate", {"prompt": "a known task"})
    assert status == 202
    task_id = reply["taskId"]
    refused_before, accepted_before = metric(daemon, REFUSED), metric(daemon, ACCEPTED)
    # Not the `web` fixture: the browser reports the blocked requests as console errors.
    with recorded_page(browser) as recorded:
        recorded.page.goto(f"{unlisted}/")
        result = recorded.page.evaluate(
            TRY_FROM_AN_UNLISTED_ORIGIN, {"daemon": daemon.url, "taskId": task_id}
        )
    assert result == {"json": "blocked", "blind": "opaque", "stream": "failed"}
    # The daemon itself refused each (the preflight, the blind POST, the
    # stream) and made no task.
    assert metric(daemon, REFUSED) - refused_before == 3
    assert metric(daemon, ACCEPTED) == accepted_before
    for refused in ("OPTIONS /generate", "POST /generate", f"GET /progress/{task_id}"):
        logged = f"refused {refused} (origin {unlisted})"

        def has_it(line: str, logged: str = logged) -> bool:
            return logged in line

        assert daemon.wait_for_output(has_it), daemon.log()


@pytest.fixture(scope="module")
def daemon_with_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    data_dir: Path = tmp_path_factory.mktemp("daemon-data")
    token_file = data_dir / "api-tokens"
    token_file.write_text(f"# for the browser test\n{TOKEN}\n")
    with running_daemon(
        data_dir, "simulator_step_time=0.02", f"api_tokens_file={token_file}"
    ) as daemon:
        yield daemon


def generate(page: Page, prompt: str) -> None:
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Name").fill(prompt)
    page.get_by_role("button", name="Generate").click()


def test_the_page_asks_for_a_token_once_and_keeps_it(
    web: RecordedPage, daemon_with_token: DaemonProcess
) -> None:
    daemon = daemon_with_token
    page = web.page
    questions: list[str] = []

    def answer(dialog: Any) -> None:
        questions.append(dialog.message)
        dialog.accept(TOKEN)

    page.on("dialog", answer)
    page.goto(f"{daemon.url}/")
    assert TOKEN not in page.content()
    generate(page, "a guarded fox")
    expect(page.locator(".carousel__title")).to_have_text("a guarded fox")
    assert len(questions) == 1
    assert "API token" in questions[0]
    stored = page.evaluate("() => localStorage.getItem('comfy-progress.apiToken')")
    assert stored == TOKEN

    # After a reload the kept token goes along; nobody is asked again.
    page.reload()
    generate(page, "a second guarded fox")
    expect(page.locator(".carousel__title")).to_have_text("a second guarded fox")
    assert len(questions) == 1
