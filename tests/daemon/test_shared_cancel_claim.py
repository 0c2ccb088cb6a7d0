"""Shared mode: a cancel asked while a worker claims the task (its holder is gone).
Real redis-server, real daemon processes, in-test simulators; a relay holds one
daemon's command so the test decides what happens first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import coredis
import trio

from daemon.http.client import ClientResponse, http_request
from daemon.simulator import ComfySimulator
from tests.daemon.harness import read_events
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import front, last, simulator, step_once_interrupted, worker
from tests.daemon.test_shared_claim import until_no_lease


def held_once(predicate: Callable[[bytes], bool]) -> Callable[[bytes], bool]:
    """The first data `predicate` says True for, and nothing after."""
    held = False

    def first(data: bytes) -> bool:
        nonlocal held
        if held or not predicate(data):
            return False
        held = True
        return True

    return first


async def until_waiting_for_a_step(sim: ComfySimulator) -> None:
    while not sim.waiting_for_step:  # noqa: ASYNC110 (the simulator has no signal for it)
        await trio.sleep(0.01)


async def test_a_cancel_between_the_claimer_s_check_and_its_record_reaches_it_at_once(
    tmp_path: Path,
) -> None:
    """The claimer read the cancel key (none yet) and has not yet written the record
    that names it; the front sets the key, reads the record (it names the old holder,
    who is gone), tells that one and answers 202. The claimer must still learn of the
    cancel when it names itself, not only at its next lease refresh (lease_timeout/4
    later): by then its ComfyUI may have run the whole prompt."""
    # Long leases: the old holder hands its task over at SIGTERM, and the claimer's
    # next refresh (and its read of the cancel keys) is minutes away.
    long_lease = ("lease_timeout=600",)
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as first_sim,
        simulator(manual=True) as claimer_sim,
        front(tmp_path, "f", redis.url) as entry,
    ):
        async with worker(tmp_path, "w1", redis.url, first_sim.url, extra=long_lease) as first:
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            first.terminate()  # its lease is handed over; its record still names it
            assert await first.wait() == 0
        task_key = f"comfy-progress:task:{task_id}".encode()
        cancelled: list[ClientResponse] = []

        async def cancel_meanwhile() -> None:
            # The claimer checked the cancel key and its prompt waits in its ComfyUI;
            # its record does not name it yet.
            await until_waiting_for_a_step(claimer_sim)
            cancelled.append(
                await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
            )

        names_itself = held_once(lambda data: task_key in data and b"SET" in data)
        async with (
            redis_proxy(redis.port, names_itself, cancel_meanwhile) as url,
            worker(tmp_path, "w2", url, claimer_sim.url, extra=long_lease),
        ):
            with trio.fail_after(30):
                await step_once_interrupted(claimer_sim)
                rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
                client = coredis.Redis.from_url(redis.url)
                async with client:
                    await until_no_lease(client)
                    # The key outlives any wait for a claimer: workers take a task only
                    # when one has room, which may be long after its holder died (it
                    # lived lease_timeout * 4 + 60 s, and a claim after that ran the task).
                    key_ttl = await client.ttl(f"comfy-progress:cancel:{task_id}")
        [answer] = cancelled
        assert answer.status == 202
        assert last(rest)["error"]["code"] == "cancelled"
        assert key_ttl > 12 * 3600


WAITING = "comfy-progress:waiting"


async def test_a_cancel_of_a_task_still_in_line_whose_taker_died_and_its_claim_end_it_once(
    tmp_path: Path,
) -> None:
    """The taker got the queue entry and died before taking the task out of the
    waiting set. A front's cancel takes it out (it waits: nobody runs it) and, before
    it writes the end, the worker claiming the dead taker's entry finds the task not
    ended and runs it. The cancel must still end the task, once: answered 202, the
    claimer's prompt interrupted, the entry acknowledged."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as first_sim,
        simulator(manual=True) as claimer_sim,
    ):
        cancelling = False
        front_held = trio.Event()
        claimer_runs = trio.Event()

        def writes_the_end(data: bytes) -> bool:
            return cancelling and b"XADD" in data and b"comfy-progress:events:" in data

        async def until_the_claimer_runs() -> None:
            front_held.set()
            await claimer_runs.wait()

        taking = trio.Event()

        async def die_there() -> None:
            taking.set()
            await trio.sleep_forever()

        def takes_out_of_line(data: bytes) -> bool:
            return b"ZREM" in data and WAITING.encode() in data

        async with (
            redis_proxy(redis.port, held_once(writes_the_end), until_the_claimer_runs) as f_url,
            front(tmp_path, "f", f_url) as entry,
        ):
            async with (
                redis_proxy(redis.port, takes_out_of_line, die_there) as url,
                worker(tmp_path, "w1", url, first_sim.url) as doomed,
            ):
                task_id = await generate(entry.url)
                await taking.wait()
                doomed.kill()
                assert await doomed.wait() == -9
            cancelled: list[ClientResponse] = []

            async def cancel() -> None:
                cancelled.append(
                    await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=30)
                )

            async with trio.open_nursery() as nursery:
                cancelling = True
                nursery.start_soon(cancel)
                await front_held.wait()
                async with worker(tmp_path, "w2", redis.url, claimer_sim.url):
                    with trio.fail_after(30):
                        await until_waiting_for_a_step(claimer_sim)  # it runs the task
                        claimer_runs.set()
                        await step_once_interrupted(claimer_sim)
                        done = await read_events(entry.url, task_id)
                        client = coredis.Redis.from_url(redis.url)
                        async with client:
                            await until_no_lease(client)
        [answer] = cancelled
        assert answer.status == 202
        assert last(done)["error"]["code"] == "cancelled"
