"""Shared mode: a worker that comes back after another claimed its task (it was cut
off from its leases longer than lease_timeout). Real redis-server, real daemon
processes, in-test simulators; relays hold one daemon's command so the test decides
what happens first."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import coredis
import trio

from daemon.http.client import http_request
from daemon.shared.ending import ended_while_waiting
from daemon.shared.store import SharedStore, version_of
from protocol import task
from tests.daemon.harness import read_events
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_metrics import P, Scrape
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import (
    ends_counted,
    front,
    history_ids,
    last,
    leases,
    scrape,
    simulator,
    until_first_preview,
    until_logged,
    worker,
)
from tests.daemon.test_shared_claim import until_no_lease

EVENTS = "comfy-progress:events:"


def refreshes_leases(data: bytes) -> bool:
    """A worker's lease refresh (the script that re-XCLAIMs its own entries)."""
    return b"XPENDING" in data and b"XCLAIM" in data


@asynccontextmanager
async def redis_server_and_client(
    tmp_path: Path,
) -> AsyncIterator[tuple[str, int, coredis.Redis[bytes]]]:
    async with redis_server(tmp_path / "redis") as redis:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url)
        async with client:
            yield redis.url, redis.port, client


async def newest_version(client: coredis.Redis[bytes], task_id: str) -> int:
    [newest] = await client.xrevrange(f"{EVENTS}{task_id}", count=1)
    return version_of(newest.identifier)


async def test_a_worker_back_after_its_lease_was_claimed_writes_nothing_and_the_task_ends(
    tmp_path: Path,
) -> None:
    """The holder's leases go unrefreshed past lease_timeout (a partition between it
    and Redis) while its ComfyUI goes on; another worker claims the task. Before the
    claimer writes its first snapshot, the old holder's ComfyUI moves on: the old
    holder must not write that (two writers of one stream: the claimer's write would
    be refused, it would stop its copy and hold the entry for ever, and the old
    holder, told by its next refresh that the lease is gone, stops too: nobody runs
    the task)."""
    busy = ("backend_max_pending=1",)  # the holder claims nothing itself while it runs
    async with (
        redis_server_and_client(tmp_path) as (redis_url, redis_port, client),
        simulator(manual=True) as first_sim,
        simulator(manual=True) as claimer_sim,
        front(tmp_path, "f", redis_url) as entry,
    ):
        reconnected = trio.Event()
        holder_wrote = trio.Event()
        events_key = b""

        async def partitioned() -> None:
            await reconnected.wait()

        def holder_sends(data: bytes) -> None:
            if events_key and events_key in data and b"XADD" in data:
                holder_wrote.set()

        async with (
            redis_proxy(redis_port, refreshes_leases, partitioned, holder_sends) as holder_url,
            worker(tmp_path, "w1", holder_url, first_sim.url, extra=busy) as stale,
        ):
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            events_key = f"{EVENTS}{task_id}".encode()
            held_once = False

            def claimer_writes(data: bytes) -> bool:
                nonlocal held_once
                if held_once or b"XADD" not in data or events_key not in data:
                    return False
                held_once = True
                return True

            old_holder_moved_on = trio.Event()
            versions: list[int] = []  # the stream's newest at the claim, and after

            async def old_holder_goes_first() -> None:
                # The claimer read the stream's newest version and is about to write
                # past it; meanwhile the old holder's ComfyUI moves on, and the old
                # holder sends that snapshot before its (slow) refresh is answered.
                claimed_at = await newest_version(client, task_id)
                first_sim.grant_steps(1)
                await holder_wrote.wait()  # sent behind its refresh, before the answer
                reconnected.set()
                while (  # noqa: ASYNC110 (no signal across processes)
                    await newest_version(client, task_id) == claimed_at
                    and b"stopping our copy" not in stale.output
                ):
                    await trio.sleep(0.02)
                versions.extend([claimed_at, await newest_version(client, task_id)])
                old_holder_moved_on.set()

            async with (
                redis_proxy(redis_port, claimer_writes, old_holder_goes_first) as claimer_url,
                worker(tmp_path, "w2", claimer_url, claimer_sim.url),
            ):
                await old_holder_moved_on.wait()
                claimer_sim.grant_steps(1000)
                with trio.fail_after(30):
                    done = await read_events(
                        entry.url, task_id, last_event_id=int(seen[-1].id or 0)
                    )
                    assert last(done)["status"] == "completed", last(done)
                    await until_no_lease(client)  # nobody holds the entry any more
            # Refused: the stream went on from where the claimer took it.
            [claimed_at, after_old_holder] = versions
            assert after_old_holder == claimed_at
        assert len(await history_ids(claimer_sim)) == 1


def hands_back(data: bytes) -> bool:
    """A stopping worker's hand-over of its leases (XCLAIM with an idle time)."""
    return b"XCLAIM" in data and b"IDLE" in data.upper()


async def test_a_worker_stopped_after_its_lease_was_claimed_hands_back_only_its_own(
    tmp_path: Path,
) -> None:
    """SIGTERM reaches a worker cut off from Redis past its lease: another worker has
    claimed its task meanwhile. Its hand-over at stopping must not take that lease
    from the claimer (who would stop its copy at its next refresh, and the task move
    once more)."""
    busy = ("backend_max_pending=1",)  # the holder claims nothing itself while it runs
    async with (
        redis_server_and_client(tmp_path) as (redis_url, redis_port, client),
        simulator(manual=True) as first_sim,
        simulator(manual=True) as claimer_sim,
        front(tmp_path, "f", redis_url) as entry,
    ):
        reconnected = trio.Event()
        handing_back = trio.Event()

        async def partitioned() -> None:
            await reconnected.wait()

        def holder_sends(data: bytes) -> None:
            if hands_back(data):
                handing_back.set()

        async with (
            redis_proxy(redis_port, refreshes_leases, partitioned, holder_sends) as holder_url,
            worker(tmp_path, "w1", holder_url, first_sim.url, extra=busy) as stale,
        ):
            task_id = await generate(entry.url)
            await read_events(entry.url, task_id, stop_after=sampling)
            [lease] = await leases(client)
            async with worker(tmp_path, "w2", redis_url, claimer_sim.url):
                with trio.fail_after(30):
                    while (claimed := await leases(client))[0].consumer == lease.consumer:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                stale.terminate()
                with trio.fail_after(30):
                    await handing_back.wait()  # sent behind its refresh
                reconnected.set()
                assert await stale.wait() == 0
                assert [(p.identifier, p.consumer) for p in await leases(client)] == [
                    (claimed[0].identifier, claimed[0].consumer)
                ]


async def test_a_worker_whose_write_another_daemon_outran_lets_the_entry_go(
    tmp_path: Path,
) -> None:
    """Another daemon wrote past the holder's version while the holder still has the
    lease (here: the end a front of an earlier release wrote, racing a claim). The
    holder's next write is refused and it stops its copy; it must not go on refreshing
    the entry for ever (held by a worker that runs nothing, counted by
    max_queued_tasks): let go, it is claimed after the lease, found ended, and
    acknowledged."""
    async with (
        redis_server_and_client(tmp_path) as (redis_url, _, client),
        simulator(manual=True) as sim,
        front(tmp_path, "f", redis_url) as entry,
        worker(tmp_path, "w", redis_url, sim.url) as holder,
    ):
        task_id = await generate(entry.url)
        await read_events(entry.url, task_id, stop_after=sampling)
        # What such a front wrote, through the same code: the end after the newest.
        store = SharedStore(client, "comfy-progress", retention=3600)
        shared = await store.load(task_id)
        latest = await store.latest(task_id)
        assert shared is not None
        assert latest is not None
        cancelled: list[task.TaskEvent] = [
            task.CancelRequested(),
            task.Cancelled("cancelled before it reached ComfyUI"),
        ]
        _, end, _ = ended_while_waiting(shared, latest.version, cancelled, time.time())
        await store.append(task_id, end)
        sim.grant_steps(1)  # the holder's next write comes after it
        with trio.fail_after(30):
            await until_logged(holder, b"stopping our copy")
            await until_no_lease(client)


async def test_a_worker_back_after_its_lease_was_claimed_writes_no_preview(
    tmp_path: Path,
) -> None:
    """The holder is cut off from Redis past lease_timeout, another worker claims its
    task, and the old holder's ComfyUI sends the next step's preview. The stale copy
    must not put that preview in Redis: every front would serve it as the preview of
    a task another worker runs now (the preview used to go before the write that
    checks the lease)."""
    busy = ("backend_max_pending=1",)  # the holder claims nothing itself while it runs
    async with (
        redis_server_and_client(tmp_path) as (redis_url, redis_port, client),
        simulator(manual=True, previews=True) as first_sim,
        simulator(manual=True) as claimer_sim,
        front(tmp_path, "f", redis_url) as entry,
    ):
        cut_off = False
        reconnected = trio.Event()
        holder_wrote = trio.Event()
        task_key = b""

        def refreshes_once_cut_off(data: bytes) -> bool:
            return cut_off and refreshes_leases(data)

        async def partitioned() -> None:
            await reconnected.wait()

        def holder_sends(data: bytes) -> None:
            # After the claim: the stale copy's preview or snapshot (whichever first).
            if task_key and task_key in data and (b"HSET" in data or b"XADD" in data):
                holder_wrote.set()

        async with (
            redis_proxy(redis_port, refreshes_once_cut_off, partitioned, holder_sends) as url,
            worker(tmp_path, "w1", url, first_sim.url, extra=busy) as stale,
        ):
            task_id = await generate(entry.url)
            _, preview_path = await until_first_preview(entry.url, task_id, first_sim)
            preview_url = entry.url + preview_path
            before = await http_request("GET", preview_url, timeout=10)
            assert before.status == 200
            [lease] = await leases(client)
            cut_off = True
            async with worker(tmp_path, "w2", redis_url, claimer_sim.url):
                with trio.fail_after(30):
                    while (await leases(client))[0].consumer == lease.consumer:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                    # The claimer's task is a new attempt, whose snapshots announce no
                    # preview yet: its first write deletes the old holder's.
                    while (await http_request("GET", preview_url, timeout=10)).status != 404:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                task_key = task_id.encode()
                first_sim.grant_steps(1)  # the old holder's next step: a newer preview
                with trio.fail_after(30):
                    await holder_wrote.wait()  # sent behind its refresh
                reconnected.set()
                with trio.fail_after(30):
                    await until_logged(stale, b"stopping our copy")
                after = await http_request("GET", preview_url, timeout=10)
                assert after.status == 404, after.headers


async def until_ended_locally(daemon_url: str) -> Scrape:
    """Until the daemon's own copy of its one task has ended in an error (its tasks
    gauge says so)."""
    while True:
        scraped = await scrape(daemon_url)
        if scraped.value(P("tasks"), state="error") == 1:
            return scraped
        await trio.sleep(0.05)


async def test_a_task_that_ended_on_both_sides_of_a_split_is_counted_once(
    tmp_path: Path,
) -> None:
    """The holder is cut off from Redis past its lease; another worker claims the task
    and runs it to its end, while the old holder's ComfyUI finishes the first attempt.
    Only the end Redis took is the task's: the cluster's metrics count one end (the
    old holder counted its own as soon as its copy ended, the claimer its own: two),
    and nothing of the old holder's end reaches the stream when it is back."""
    busy = ("backend_max_pending=1",)  # the holder claims nothing itself while it runs
    async with (
        redis_server_and_client(tmp_path) as (redis_url, redis_port, client),
        simulator(manual=True) as first_sim,
        simulator(manual=False) as claimer_sim,
        front(tmp_path, "f", redis_url) as entry,
    ):
        cut_off = False
        reconnected = trio.Event()

        def refreshes_once_cut_off(data: bytes) -> bool:
            return cut_off and refreshes_leases(data)

        async def partitioned() -> None:
            await reconnected.wait()

        async with (
            redis_proxy(redis_port, refreshes_once_cut_off, partitioned) as url,
            worker(tmp_path, "w1", url, first_sim.url, extra=busy) as stale,
        ):
            task_id = await generate(entry.url)
            await read_events(entry.url, task_id, stop_after=sampling)
            cut_off = True
            async with worker(tmp_path, "w2", redis_url, claimer_sim.url) as claimer:
                with trio.fail_after(30):
                    done = await read_events(entry.url, task_id)
                    await until_no_lease(client)  # the claimer's end, acknowledged
                assert last(done)["status"] == "completed"
                # The old holder's attempt ends too, in an error: an end that needs no
                # Redis (a completed one waits for its images to be stored there).
                first_sim.engine.interrupt(None)  # someone at that ComfyUI
                first_sim.grant_steps(1000)
                with trio.fail_after(30):
                    at_stale = await until_ended_locally(stale.url)
                assert ends_counted(await scrape(claimer.url), "completed") == 1
                assert ends_counted(at_stale, "error", "interrupted") == 0, at_stale.text
                reconnected.set()
                with trio.fail_after(30):
                    await until_logged(stale, b"stopping our copy")
                assert ends_counted(await scrape(stale.url), "error", "interrupted") == 0
                assert await newest_version(client, task_id) == int(done[-1].id or 0)


async def test_a_worker_whose_ended_copy_lost_its_lease_writes_nothing_of_it(
    tmp_path: Path,
) -> None:
    """The holder's writes and lease refreshes fail (a split: Redis unreachable) past
    its lease; another worker claims the task and runs it, while the old holder's
    copy ends. When its refreshes get through again before its write of that end
    (which waits out its backoff), the refresh says the lease is another's: the old
    holder must write nothing more of the task. It used to forget the lease but keep
    its ended copy, whose end then went to Redis with no lease to check, in the
    middle of the claimer's run."""
    busy = ("backend_max_pending=1",)  # the holder claims nothing itself while it runs
    async with (
        redis_server_and_client(tmp_path) as (redis_url, redis_port, client),
        simulator(manual=True) as first_sim,
        simulator(manual=True) as claimer_sim,
        front(tmp_path, "f", redis_url) as entry,
    ):
        refreshes_fail = False
        events_key = b"\0"  # the task's, once it is known
        appended = trio.Event()

        def fails(data: bytes) -> bool:
            # The task's writes fail from the split on: only the refreshes get through.
            writes = events_key in data and b"EVAL" in data
            return writes or (refreshes_fail and refreshes_leases(data))

        async def cut() -> None:
            raise OSError("no route to Redis")  # the relay drops the connection

        def holder_sends(data: bytes) -> None:
            if events_key in data and b"XADD" in data and b"EVAL" not in data:
                appended.set()  # a snapshot written with no lease checked

        async with (
            redis_proxy(redis_port, fails, cut, holder_sends) as url,
            worker(tmp_path, "w1", url, first_sim.url, extra=busy) as stale,
        ):
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            [lease] = await leases(client)
            refreshes_fail = True
            events_key = f"{EVENTS}{task_id}".encode()
            async with worker(tmp_path, "w2", redis_url, claimer_sim.url):
                with trio.fail_after(30):
                    while (await leases(client))[0].consumer == lease.consumer:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                first_sim.engine.interrupt(None)  # the old holder's copy ends (no Redis)
                first_sim.grant_steps(1000)
                with trio.fail_after(30):
                    await until_ended_locally(stale.url)
                refreshes_fail = False
                with trio.fail_after(30):
                    while not appended.is_set() and b"stopping our copy" not in stale.output:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                assert not appended.is_set()
                claimer_sim.grant_steps(1000)
                with trio.fail_after(30):
                    done = await read_events(
                        entry.url, task_id, last_event_id=int(seen[-1].id or 0)
                    )
                    await until_no_lease(client)  # the claimer's end, acknowledged
                assert last(done)["status"] == "completed"
                assert await newest_version(client, task_id) == int(done[-1].id or 0)
