"""The event loop stays responsive: the loop monitor, and uploads read off the loop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

import daemon.api.source_images
from daemon.ops.loop_monitor import LoopMonitor
from protocol.imagesize import MAX_HEADER_STEPS, ImageInfo
from protocol.upload import check_upload
from tests.daemon.harness import running_daemon
from tests.protocol.images import jpeg


async def test_the_monitor_names_the_task_with_the_longest_step() -> None:
    def busy() -> int:
        return sum(i * i for i in range(300_000))  # one step with plenty of CPU work

    async def quick() -> None:
        for _ in range(50):
            await trio.lowlevel.checkpoint()

    async def hog() -> None:
        busy()
        await trio.lowlevel.checkpoint()

    with LoopMonitor(keep=3).installed() as monitor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(quick)
            nursery.start_soon(hog)
    longest = monitor.longest()
    assert len(longest) == 3
    assert longest[0].task.endswith("hog")
    assert monitor.steps > 50
    assert longest == sorted(longest, reverse=True)


async def test_a_hostile_upload_is_read_off_the_loop_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JPEG of a million empty comment segments took seconds of the loop's time."""
    checked_on: list[bool] = []

    def spy(content_type: str | None, body: bytes) -> ImageInfo:
        checked_on.append(threading.current_thread() is threading.main_thread())
        return check_upload(content_type, body)

    monkeypatch.setattr(daemon.api.source_images, "check_upload", spy)
    hostile = jpeg(64, 64, before_sof=b"\xff\xfe\x00\x02" * 250_000)  # 1 MB
    with trio.fail_after(30):
        async with running_daemon(tmp_path) as d:
            response = await d.request(
                "POST", "/upload", hostile, headers=(("Content-Type", "image/jpeg"),)
            )
    assert response.status == 400, response.body
    assert f"gave up after {MAX_HEADER_STEPS}" in response.json()["error"]["message"]
    assert checked_on == [False]  # read in a worker thread, not on the event loop
