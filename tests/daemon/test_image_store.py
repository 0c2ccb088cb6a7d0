"""The image store in memory and on disk: one size limit, served in slices, retention."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import coredis
import pytest
import trio

from daemon.config import ConfigError, load
from daemon.http.client import http_request
from daemon.images.retention import ImageJanitor, RetentionPolicy
from daemon.images.store import ImageStore
from daemon.shared.images import SharedImageStore
from daemon.shared.store import image_key
from daemon.simulator import ComfySimulator
from tests.daemon.comfy_relay import comfy_relay
from tests.daemon.harness import FAST, Daemon, payloads, running_daemon
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.protocol.images import png, png_chunk
from tests.protocol.workflow_samples import txt2img_definition

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


async def test_an_image_a_task_takes_while_the_janitor_sweeps_is_kept(tmp_path: Path) -> None:
    # A task finishes (its image saved and made its result) just after the janitor
    # asked what is in use: had it read the folder only then, the new image would
    # look unused and, being the newest, go first over the size budget.
    store = ImageStore(tmp_path)
    held = await store.save(png(16, 16))
    claimed = {held}
    fresh = "F" * 22 + ".png"

    def in_use() -> set[str]:
        listing = set(claimed)
        if fresh not in claimed:  # saved and claimed the moment after this answer
            (tmp_path / fresh).write_bytes(png(16, 16))
            claimed.add(fresh)
        return listing

    budget = (tmp_path / held).stat().st_size + 1  # the held image nearly fills it
    janitor = ImageJanitor(store, RetentionPolicy(retention=0, max_bytes=budget), in_use=in_use)
    with trio.fail_after(10):
        assert await janitor.sweep() == []
    assert sorted(os.listdir(tmp_path)) == sorted([held, fresh])


async def test_a_tasks_first_images_are_kept_while_it_fetches_the_next(tmp_path: Path) -> None:
    definition = txt2img_definition()
    graph = definition["graph"]
    graph["5"]["inputs"]["batch_size"] = 2  # two images, fetched in turn
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    del definition["parameters"]["tiled"]
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "two.json").write_text(json.dumps(definition), encoding="utf-8")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sim = ComfySimulator(FAST)
            port = await nursery.start(sim.run, ("127.0.0.1", 0))
            async with (
                comfy_relay(port) as relay,
                running_daemon(
                    tmp_path,
                    simulator=None,
                    comfy_url=relay.url,
                    workflows_dir=str(workflows),
                    max_image_store_bytes=1,  # every image no task holds goes
                ) as daemon,
            ):
                relay.hold_answers(b"GET /view?filename=ComfyUI_00002_")
                task_id = await daemon.generate(workflow="two", width=64)
                await relay.holding.wait()  # the first image is stored, the second on its way
                deleted = await daemon.app.image_janitor.sweep()
                relay.release()
                last = payloads(await daemon.events(task_id))[-1]
                assert last["status"] == "completed", last
                urls = last["result"]["imageUrls"]
                statuses = [(await daemon.request("GET", url)).status for url in urls]
            nursery.cancel_scope.cancel()
    assert deleted == []
    assert statuses == [200, 200]


async def test_an_image_on_disk_whose_save_has_not_returned_is_kept(tmp_path: Path) -> None:
    # In shared mode a save writes the file, then SETs the image in Redis: until
    # save() returns nobody holds the name, yet the file is in the folder.
    images = tmp_path / "images"
    setting = trio.Event()  # the image's SET reached the proxy (the file is on disk)
    go_on = trio.Event()

    async def hold_the_set() -> None:
        setting.set()
        await go_on.wait()

    async with (
        redis_server(tmp_path / "redis") as redis,
        redis_proxy(redis.port, lambda data: b"test:image:" in data, hold_the_set) as url,
    ):
        client = coredis.Redis.from_url(url)
        async with client, trio.open_nursery() as nursery:
            store = SharedImageStore(images, client, "test", ttl=3600)
            await store.open()
            policy = RetentionPolicy(retention=0, max_bytes=1)  # every unused image goes
            janitor = ImageJanitor(store, policy, in_use=set)
            saved: list[str] = []

            async def save() -> None:
                saved.append(await store.save(png(16, 16)))

            with trio.fail_after(20):
                nursery.start_soon(save)
                await setting.wait()
                deleted = await janitor.sweep()
                go_on.set()
    assert deleted == []
    assert os.listdir(images) == saved


async def test_a_source_image_a_request_is_reading_is_kept_until_its_task_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between reading the source and making the task, a POST /generate awaits (a
    slow disk here): a sweep then must not take the old image the task will need."""
    store_read_done = trio.Event()
    go_on = trio.Event()
    with trio.fail_after(30):
        async with running_daemon(tmp_path, image_retention=3600.0) as daemon:
            store = daemon.app.images
            source_url = await upload(daemon, png(64, 64))
            source = source_url.rsplit("/", 1)[1]
            age(store, source, YEAR)
            read = store.read

            async def slow_read(name: str) -> bytes | None:
                data = await read(name)
                store_read_done.set()
                await go_on.wait()
                return data

            monkeypatch.setattr(store, "read", slow_read)
            inpaint = {
                "prompt": "a hat",
                "inpaint": True,
                "image": source_url,
                "inpaintArea": {"x": 0, "y": 0, "width": 32, "height": 32},
                "steps": 1,
            }
            async with trio.open_nursery() as nursery:
                replies = []

                async def generate() -> None:
                    replies.append(await daemon.request("POST", "/generate", inpaint))

                nursery.start_soon(generate)
                await store_read_done.wait()
                deleted = await daemon.app.image_janitor.sweep()
                monkeypatch.setattr(store, "read", read)
                go_on.set()
            [reply] = replies
            assert reply.status == 202, reply.body
            last = payloads(await daemon.events(reply.json()["taskId"]))[-1]
            outside = {**inpaint, "inpaintArea": {"x": 60, "y": 0, "width": 32, "height": 32}}
            refused = await daemon.request("POST", "/generate", outside)
    assert deleted == []
    assert last["status"] == "completed", last
    assert refused.status == 400, refused.body
    assert store.reading == {}  # released: by the task made, and by the request refused


def test_uploads_may_not_be_larger_than_what_is_served() -> None:
    with pytest.raises(ConfigError, match="max_upload_bytes must be at most max_image_bytes"):
        load(
            config_file=None,
            environ={},
            flags={"max_upload_bytes": str(32 * MiB), "max_image_bytes": str(16 * MiB)},
        )


async def test_an_image_copied_from_redis_goes_from_disk_when_its_redis_copy_expires(
    tmp_path: Path,
) -> None:
    """A daemon that serves an image only Redis had keeps a copy on its disk: the copy
    is as old as the image (Redis' expiry, counted from the save, says how old), so
    retention deletes it when Redis' copy expires, not image_retention after the copy
    was made (that daemon alone would serve it meanwhile, every other one 404)."""
    async with redis_server(tmp_path / "redis") as redis:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url)
        async with client:
            worker = SharedImageStore(tmp_path / "worker", client, "test", ttl=3600)
            await worker.open()
            name = await worker.save(png(16, 16))
            await client.expire(image_key("test", name), 60)  # saved 3540 s ago
            front = SharedImageStore(tmp_path / "front", client, "test", ttl=3600)
            await front.open()
            await front.fetch_to_disk(name)
            assert os.listdir(tmp_path / "front") == [name]
            later = time.time() + 120  # past Redis' expiry of the image
            policy = RetentionPolicy(retention=3600, max_bytes=0)
            janitor = ImageJanitor(front, policy, in_use=set, wall_clock=lambda: later)
            assert await janitor.sweep() == [name]
