"""Serve the page from disk under a made-up origin and sub-path, inside Chromium.

Playwright answers every request of the page itself (`page.route`), so these
tests need no daemon: the files come from public/ and node_modules/ exactly as
the daemon would serve them (node_modules at vendor/), and the API answers are
scripted per test. This is how the page is checked under a reverse-proxy
sub-path and how the browser's real EventSource is made to fail on cue.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.sync_api import Page, Route

from tests.web.browser import REPO_ROOT

CONTENT_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".css": "text/css"}

# A 1x1 PNG, for result images.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4"
    "890000000d49444154789c6360f8cfc0f01f0005000201e2213bc10000000049454e44ae426082"
)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"

    @staticmethod
    def json(status: int, obj: object) -> Answer:
        return Answer(status, json.dumps(obj).encode())


def sse(*events: tuple[str, int, dict[str, Any]], retry_ms: int | None = None) -> Answer:
    """A whole event stream (the connection ends after it, like a dropped stream)."""
    parts = [f"retry: {retry_ms}\n\n"] if retry_ms is not None else []
    for name, event_id, payload in events:
        parts.append(f"id: {event_id}\nevent: {name}\ndata: {json.dumps(payload)}\n\n")
    return Answer(200, "".join(parts).encode(), "text/event-stream")


@dataclass
class Hit:
    method: str
    path: str  # below the base path, e.g. "progress/t1"
    query: str


@dataclass
class FakeOrigin:
    """`base` is where the page lives, e.g. http://comfy.test/tools/comfy/."""

    base: str
    # "METHOD path" -> answers given in turn (the last one repeats); a callable
    # answer is asked at request time (e.g. a gate the test opens).
    script: dict[str, list[Answer | Callable[[], Answer]]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # requests that left `base`

    def on(self, method: str, path: str, *answers: Answer | Callable[[], Answer]) -> None:
        self.script[f"{method} {path}"] = list(answers)

    def install(self, page: Page) -> None:
        page.route("**/*", self._handle)

    def hits_for(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    def _handle(self, route: Route) -> None:
        request = route.request
        if not request.url.startswith(self.base):
            self.outside.append(request.url)
            route.abort()
            return
        parts = urlsplit(request.url[len(self.base) :])
        hit = Hit(request.method, parts.path, parts.query)
        self.hits.append(hit)
        answer = self._scripted(hit) or self._file(hit)
        route.fulfill(
            status=answer.status,
            body=answer.body,
            headers={"Content-Type": answer.content_type, "Cache-Control": "no-store"},
        )

    def _scripted(self, hit: Hit) -> Answer | None:
        answers = self.script.get(f"{hit.method} {hit.path}")
        if not answers:
            return None
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return answer() if callable(answer) else answer

    def _file(self, hit: Hit) -> Answer:
        if hit.method != "GET":
            return Answer.json(405, {"error": {"message": "method not allowed"}})
        path = hit.path or "index.html"
        if path.startswith("vendor/"):
            file = REPO_ROOT / "node_modules" / path.removeprefix("vendor/")
        elif path.startswith("image/"):
            return Answer(200, PNG_1X1, "image/png")
        else:
            file = REPO_ROOT / "public" / path
        if ".." in Path(path).parts or not file.is_file():
            return Answer.json(404, {"error": {"message": "not found"}})
        content_type = CONTENT_TYPES.get(file.suffix) or (
            mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        )
        return Answer(200, file.read_bytes(), content_type)
