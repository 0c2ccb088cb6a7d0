"""The page in real Chromium with scripted answers: sub-path URLs, stream loss, errors.

No daemon here (see fake_origin.py); test_end_to_end.py runs the real one.
"""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import expect

from tests.web.browser import RecordedPage
from tests.web.fake_origin import Answer, FakeOrigin, sse

BASE = "http://comfy.test/tools/comfy/"  # a reverse proxy's sub-path


def accepted(task_id: str) -> Answer:
    return Answer.json(
        202,
        {
            "taskId": task_id,
            "status": "queued",
            "progressUrl": f"/progress/{task_id}",
            "statusUrl": f"/tasks/{task_id}",
        },
    )


def sampling(task_id: str, value: int, of: int, overall: float) -> dict[str, Any]:
    """A progress message as protocol/task.py renders one for a KSampler tick."""
    return {
        "taskId": task_id,
        "status": "in-progress",
        "phase": "running",
        "progress": {
            "percentage": round(value / of * 100, 1),
            "currentStep": "Sampling image...",
            "currentValue": value,
            "maxValue": of,
            "overall": {"percentage": overall, "nodesDone": 4, "nodesTotal": 7},
            "etaSeconds": 4.0,
            "node": "3",
            "nodeType": "KSampler",
        },
        "queue": None,
        "timestamp": "2025-11-25T12:34:56.789Z",
    }


def completed(task_id: str, image: str, name: str) -> dict[str, Any]:
    return {
        "taskId": task_id,
        "status": "completed",
        "progress": {
            "percentage": 100,
            "currentStep": "Complete",
            "currentValue": 20,
            "maxValue": 20,
        },
        "result": {
            "imageUrl": f"/image/{image}",
            "imageUrls": [f"/image/{image}"],
            "prompt": "a lighthouse",
            "seed": 7,
            "name": name,
            "workflow": "txt2img",
            "uid": 1,
        },
        "timestamp": "2025-11-25T12:35:30.123Z",
    }


def failed(task_id: str, message: str) -> dict[str, Any]:
    return {
        "taskId": task_id,
        "status": "error",
        "progress": {"percentage": 0, "currentStep": "Failed", "currentValue": 0, "maxValue": 0},
        "error": {
            "message": message,
            "details": "RuntimeError in node 3 (KSampler)",
            "code": "comfy_error",
        },
        "timestamp": "2025-11-25T12:35:30.123Z",
    }


def submit(web: RecordedPage, prompt: str, name: str = "") -> None:
    page = web.page
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Name").fill(name)
    page.get_by_role("button", name="Generate").click()


def test_under_a_sub_path_a_lost_stream_resumes_from_the_last_event_id(web: RecordedPage) -> None:
    origin = FakeOrigin(BASE)
    origin.on("POST", "generate", accepted("t-1"))
    gate = {"open": False}

    def after_the_drop() -> Answer:
        # 503 makes Chromium give up on the EventSource (readyState CLOSED), so
        # the page's own backoff must reconnect, until the test opens the gate.
        if not gate["open"]:
            return Answer.json(503, {"error": {"message": "busy"}})
        return sse(("complete", 3, completed("t-1", "done.png", "Lighthouse")))

    origin.on(
        "GET",
        "progress/t-1",
        # One event, then the connection ends: Chromium reconnects by itself.
        sse(("progress", 1, sampling("t-1", 9, 20, 58.6)), retry_ms=50),
        after_the_drop,
    )
    origin.install(web.page)
    page = web.page
    page.goto(BASE)
    submit(web, "a lighthouse", "Lighthouse")

    banner = page.locator(".progress-banner")
    expect(banner.locator(".progress-banner__step")).to_have_text("Sampling image...")
    expect(banner.locator(".progress-banner__counter")).to_have_text("9/20")
    expect(banner.locator(".progress-banner__percent")).to_have_text("58%")
    expect(banner.locator(".progress-banner__fill")).to_have_attribute(
        "style", re.compile(r"width: 58%")
    )

    # Wait until the page's own reconnect (not the browser's) has been refused once.
    page.wait_for_function(
        "() => performance.getEntriesByType('resource')"
        ".some(e => e.name.includes('progress/t-1?lastEventId=1'))"
    )
    gate["open"] = True

    image = page.locator("img.carousel__image")
    expect(image).to_have_attribute("src", "image/done.png")
    expect(page.locator(".toast--success .toast__text")).to_have_text(
        re.compile("Image ready: Lighthouse")
    )
    expect(banner).to_have_count(0)

    streams = origin.hits_for("progress/t-1")
    assert streams[0].query == "", "the first connection starts from the beginning"
    # Chromium's own reconnect comes first, without our query (it sends the
    # Last-Event-ID header itself, which interception does not show); the
    # page's new EventSource cannot send headers, so it resumes with the query.
    assert streams[1].query == ""
    assert all(h.query == "lastEventId=1" for h in streams[2:])
    assert len(streams) >= 3
    # Every request stayed under the sub-path, relative URLs resolved against the page.
    assert origin.outside == []
    assert all(url.startswith(BASE) for url in web.requests)
    assert f"{BASE}image/done.png" in web.requests
    assert image.evaluate("img => img.naturalWidth") == 1


def test_an_error_event_shows_the_servers_message_until_dismissed(web: RecordedPage) -> None:
    origin = FakeOrigin(BASE)
    origin.on("POST", "generate", accepted("t-2"))
    origin.on(
        "GET",
        "progress/t-2",
        sse(
            ("progress", 1, sampling("t-2", 3, 20, 50)),
            ("error-event", 2, failed("t-2", "CUDA out of memory")),
        ),
    )
    origin.install(web.page)
    page = web.page
    page.goto(BASE)
    submit(web, "a lighthouse")

    banner = page.locator(".progress-banner")
    expect(banner).to_have_attribute("data-status", "error")
    expect(banner.get_by_role("alert")).to_have_text("CUDA out of memory")
    expect(banner.locator(".progress-banner__step")).to_have_text("Failed")
    expect(banner.get_by_role("button", name="Cancel")).to_have_count(0)
    # The error stays (no auto-hide) until the user dismisses it.
    banner.get_by_role("button", name="Dismiss").click()
    expect(banner).to_have_count(0)
    expect(page.locator("img.carousel__image")).to_have_count(0)
    assert len(origin.hits_for("progress/t-2")) == 1, "a terminal event ends the stream for good"


def test_two_generations_stack_two_banners(web: RecordedPage) -> None:
    origin = FakeOrigin(BASE)
    origin.on("POST", "generate", accepted("t-a"), accepted("t-b"))
    # A long retry keeps Chromium from reconnecting while the test looks.
    origin.on(
        "GET", "progress/t-a", sse(("progress", 1, sampling("t-a", 5, 20, 60)), retry_ms=60_000)
    )
    origin.on(
        "GET",
        "progress/t-b",
        sse(
            (
                "progress",
                1,
                {
                    "taskId": "t-b",
                    "status": "in-progress",
                    "phase": "queued",
                    "progress": {
                        "percentage": 0,
                        "currentStep": "Queued (1 ahead)",
                        "currentValue": 0,
                        "maxValue": 0,
                    },
                    "queue": {"position": 2, "ahead": 1},
                },
            ),
            retry_ms=60_000,
        ),
    )
    origin.install(web.page)
    page = web.page
    page.goto(BASE)
    submit(web, "first", "First")
    expect(page.locator(".progress-banner")).to_have_count(1)
    submit(web, "second", "Second")

    banners = page.locator(".banner-stack > .progress-banner")
    expect(banners).to_have_count(2)
    first, second = banners.nth(0), banners.nth(1)
    expect(first).to_have_attribute("data-task-id", "t-a")
    expect(first.locator(".progress-banner__percent")).to_have_text("60%")
    expect(second).to_have_attribute("data-status", "queued")
    expect(second.locator(".progress-banner__step")).to_have_text("Queued (1 ahead)")
    expect(second.locator(".progress-banner__details")).to_have_text("1 ahead of you in the queue")
    # Stacked, not overlapping: the second sits below the first, both at the top.
    box_a, box_b = first.bounding_box(), second.bounding_box()
    assert box_a is not None
    assert box_b is not None
    assert box_a["y"] == 0
    assert box_b["y"] >= box_a["y"] + box_a["height"]
    # Sticky as the page's first element: always at the top of the window, like
    # fixed, but it takes its own room instead of covering the form.
    assert page.locator(".banner-stack").evaluate("el => getComputedStyle(el).position") == "sticky"


def test_a_dismissed_running_task_still_delivers_its_image(web: RecordedPage) -> None:
    origin = FakeOrigin(BASE)
    origin.on("POST", "generate", accepted("t-d"))
    gate = {"open": False}

    def stream() -> Answer:
        # Until the gate opens, each (re)connection gets the same snapshot and
        # ends; Chromium reconnects by itself 50 ms later.
        if not gate["open"]:
            return sse(("progress", 1, sampling("t-d", 4, 20, 40)), retry_ms=50)
        return sse(("complete", 2, completed("t-d", "late.png", "Late")))

    origin.on("GET", "progress/t-d", stream)
    origin.install(web.page)
    page = web.page
    page.goto(BASE)
    submit(web, "a lighthouse", "Late")

    banner = page.locator(".progress-banner")
    expect(banner.locator(".progress-banner__percent")).to_have_text("40%")
    banner.get_by_role("button", name="Dismiss").click()
    expect(banner).to_have_count(0)
    gate["open"] = True

    # Hidden, but still subscribed: the result lands, and the toast says so.
    expect(page.locator("img.carousel__image")).to_have_attribute("src", "image/late.png")
    expect(page.locator(".toast--success .toast__text")).to_have_text("Image ready: Late")
    expect(banner).to_have_count(0)
