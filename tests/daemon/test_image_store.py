"""The image store in memory and on disk: one size limit, served in slices, retention."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import trio

from daemon.config import ConfigError, load
from daemon.http.client import http_request
from daemon.images.store import ImageStore
from tests.daemon.harness import Daemon, payloads, running_daemon
from tests.protocol.images import png, png_chunk

MiB = 1024 * 1024
YEAR = 365 * 24 * 3600.0


def large_png(size: int) -> bytes:
    """A valid PNG of about `size` bytes (a big text chunk before its end)."""
    small = png(8, 8)
    end = png_chunk(b"IEND", b"")
    text = png_chunk(b"tEXt", b"Comment\0" + b"x" * (size - len(small) - 20))
    return small.replace(end, text + end)


async def upload(daemon: Daemon, body: bytes) -> str:
    response = await daemon.request(
        "POST", "/upload", body, headers=(("Content-Type", "image/png"),)
    )
    assert response.status == 201, response.body
    url: str = response.json()["imageUrl"]
    return url


def age(store: ImageStore, name: str, seconds: float) -> None:
    """Make a stored image look `seconds` old."""
    then = time.time() - seconds
    os.utime(store.directory / name, (then, then))


async def test_an_upload_between_16_and_20_mib_can_be_served(tmp_path: Path) -> None:
    """Those were accepted, then answered 500 "file too large" at /image."""
    body = large_png(17 * MiB)
    with trio.fail_after(30):
        async with running_daemon(tmp_path) as daemon:
            url = await upload(daemon, body)
            response = await http_request(
                "GET", daemon.url + url, timeout=30, max_response_bytes=32 * MiB
            )
    assert response.status == 200
    assert response.headers.get("content-length") == str(len(body))
    assert response.body == body


async def test_old_images_go_but_not_those_a_retained_task_needs(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_daemon(tmp_path, image_retention=3600.0) as daemon:
            store = daemon.app.images
            source_url = await upload(daemon, png(64, 64))
            lonely_url = await upload(daemon, png(32, 32))
            response = await daemon.request(
                "POST",
                "/generate",
                {
                    "prompt": "a hat",
                    "inpaint": True,
                    "image": source_url,
                    "inpaintArea": {"x": 0, "y": 0, "width": 32, "height": 32},
                    "steps": 1,
                },
            )
            assert response.status == 202, response.body
            last = payloads(await daemon.events(response.json()["taskId"]))[-1]
            assert last["status"] == "completed", last
            result = last["result"]["imageUrl"].rsplit("/", 1)[1]
            source = source_url.rsplit("/", 1)[1]
            lonely = lonely_url.rsplit("/", 1)[1]
            for name in (source, lonely, result):
                age(store, name, YEAR)
            deleted = await daemon.app.image_janitor.sweep()
            left = sorted(p.name for p in store.directory.iterdir())
    assert deleted == [lonely]
    assert left == sorted([source, result])


async def test_a_forgotten_tasks_images_may_go(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_daemon(tmp_path, task_retention=0.0) as daemon:
            task_id = await daemon.generate(steps=1)
            last = payloads(await daemon.events(task_id))[-1]
            name = last["result"]["imageUrl"].rsplit("/", 1)[1]
            while daemon.app.registry.get(task_id) is not None:
                await daemon.app.registry.changed.wait()
            age(daemon.app.images, name, YEAR)
            deleted = await daemon.app.image_janitor.sweep()
    assert deleted == [name]


async def test_over_the_size_budget_the_oldest_images_go_first(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_daemon(tmp_path, max_image_store_bytes=1) as daemon:
            store = daemon.app.images
            names = []
            for hours in (3, 1, 2):  # stored in this order, aged differently
                data = png(16, 16)
                name = await store.save(data)
                age(store, name, hours * 3600.0)
                names.append(name)
            budget = 2 * (store.directory / names[0]).stat().st_size
            daemon.app.image_janitor.policy = dataclasses.replace(
                daemon.app.image_janitor.policy, max_bytes=budget
            )
            deleted = await daemon.app.image_janitor.sweep()
            left = sorted(p.name for p in store.directory.iterdir())
    assert deleted == [names[0]]  # the 3-hour-old one
    assert left == sorted(names[1:])


def test_uploads_may_not_be_larger_than_what_is_served() -> None:
    with pytest.raises(ConfigError, match="max_upload_bytes must be at most max_image_bytes"):
        load(
            config_file=None,
            environ={},
            flags={"max_upload_bytes": str(32 * MiB), "max_image_bytes": str(16 * MiB)},
        )
