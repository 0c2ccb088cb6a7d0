"""Shared mode: a viewer that comes back with Last-Event-ID to a front whose reader of
the task's stream lags behind Redis (real redis-server, real daemon processes, an
in-test simulator; a relay holds that front's blocking read)."""

from __future__ import annotations

from pathlib import Path

import coredis
import trio

from daemon.http.client import open_stream
from protocol.sse import ServerSentEvent, SSEDecoder
from tests.daemon.harness import held_stream
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import front, last, simulator, worker
from tests.daemon.test_shared_takeover import newest_version


def reads_streams(data: bytes) -> bool:
    """A front's blocking read of the task streams it watches (and of its inbox)."""
    return b"XREAD" in data and b"XREADGROUP" not in data


def version(event: ServerSentEvent) -> int:
    return int(event.id or 0)


async def test_a_viewer_back_on_a_front_that_lags_gets_no_older_snapshot(
    tmp_path: Path,
) -> None:
    """The viewer saw version N on one front and reconnects to another that already
    streams the task to someone else, but whose reader is behind (its last read gave
    it less than N). That front's latest is older than what the viewer has seen: it
    took N for an id from the future and started over, sending its older snapshot,
    so the viewer's ids went backwards. It must read Redis instead, and send only
    what comes after N."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "a", redis.url) as ahead,
    ):
        lagging = False
        caught_up = trio.Event()
        reader_held = trio.Event()

        def held(data: bytes) -> bool:
            return lagging and reads_streams(data)

        async def release() -> None:
            reader_held.set()
            await caught_up.wait()

        client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url)
        async with (
            client,
            redis_proxy(redis.port, held, release) as behind_url,
            front(tmp_path, "b", behind_url) as behind,
        ):
            task_id = await generate(ahead.url)
            async with held_stream(behind.url, task_id) as other_viewer:
                await other_viewer.until(sampling)  # the front reads the task's stream
                lagging = True
                sim.grant_steps(1)  # its read in flight returns; the next one is held
                with trio.fail_after(30):
                    await reader_held.wait()
                behind_at_most = await newest_version(client, task_id)
                sim.grant_steps(3)
                with trio.fail_after(30):
                    while (seen := await newest_version(client, task_id)) <= behind_at_most:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                resumed: list[ServerSentEvent] = []
                answered = trio.Event()
                async with trio.open_nursery() as nursery:

                    async def come_back() -> None:
                        headers = [("Last-Event-ID", str(seen))]
                        url = f"{behind.url}/progress/{task_id}"
                        async with open_stream("GET", url, headers=headers) as response:
                            assert response.status == 200
                            decoder = SSEDecoder()
                            async for chunk in response.chunks:
                                resumed.extend(decoder.feed(chunk))
                                if resumed:
                                    answered.set()

                    async def front_caught_up() -> None:
                        # What the front sends its other viewer: its newest, once
                        # the one who came back made it read Redis.
                        await other_viewer.until(lambda e: version(e) >= seen)
                        answered.set()

                    nursery.start_soon(come_back)
                    nursery.start_soon(front_caught_up)
                    with trio.fail_after(30):
                        await answered.wait()  # the front answered, before its reader
                    caught_up.set()
                    sim.grant_steps(10_000)
        assert resumed, "nothing came after the id the viewer had seen"
        versions = [version(e) for e in resumed]
        assert versions[0] > seen, (seen, versions)
        assert versions == sorted(set(versions)), versions
        assert last(resumed)["status"] == "completed"
