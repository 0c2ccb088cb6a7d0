"""The registry of live workers (`{p}:workers`, daemon/shared/worker_registry.py):
readers see exactly the workers alive now, without scanning the keyspace (real
redis-server; workers are real processes)."""

from __future__ import annotations

from pathlib import Path

import coredis
import trio

from daemon.shared.store import SharedStore
from daemon.shared.worker_registry import publish, published, registry_key, withdraw
from tests.daemon.redis_server import redis_server
from tests.daemon.test_shared import simulator, until_published, worker

PREFIX = "comfy-progress"
HANG_GUARD = 120  # seconds; not a timing: the test waits for events, this only ends a hang


async def daemon_ids(client: coredis.Redis[bytes]) -> set[str]:
    """The daemons connected to Redis (each names its connections after its id)."""
    return {str(c["name"]) for c in await client.client_list() if c["name"]}


async def registered(client: coredis.Redis[bytes]) -> set[str]:
    return {m.decode() for m in await client.zrange(f"{PREFIX}:workers", 0, -1)}


async def test_readers_see_exactly_the_live_workers_a_dead_or_stopped_one_drops_out(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=False) as first_sim,
        simulator(manual=False) as second_sim,
    ):
        client = coredis.Redis.from_url(redis.url)
        store = SharedStore(client, PREFIX, retention=60)
        async with client:
            # Keys of other kinds do not count, whatever their names say.
            await client.set(f"{PREFIX}:caps-not-a-worker", b"{}")
            await client.set(f"{PREFIX}:task:caps:x", b"{}")
            async with (
                worker(tmp_path, "w1", redis.url, first_sim.url) as doomed,
                worker(tmp_path, "w2", redis.url, second_sim.url) as stopped,
            ):
                await until_published(redis.url, 2)
                ids = await daemon_ids(client)
                assert len(ids) == 2
                assert set(await published(store)) == ids == await registered(client)
                with trio.fail_after(HANG_GUARD):
                    doomed.kill()  # kill -9: it withdraws nothing
                    assert await doomed.wait() == -9
                    # A daemon id is `host-pid-random`.
                    (dead,) = [d for d in ids if f"-{doomed.process.pid}-" in d]
                    # Its backends drop out with its key's expiry (3 leases, 4 s here).
                    while await client.exists([store.capabilities_key(dead)]):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    assert set(await published(store)) == ids - {dead}
                    while dead in await registered(client):  # pruned once its expiry passed
                        await published(store)
                        await trio.sleep(0.05)
                    assert set(await published(store)) == ids - {dead}
                    stopped.terminate()
                    assert await stopped.wait() == 0
                # SIGTERM: it left the registry on its way out, nothing waits for an expiry.
                assert await registered(client) == set()
                assert await published(store) == {}
                assert await client.keys(f"{PREFIX}:caps:*") == set()


async def test_a_withdrawn_or_expired_worker_is_not_read_and_one_publishing_again_stays(
    tmp_path: Path,
) -> None:
    async with redis_server(tmp_path / "redis") as redis:
        client = coredis.Redis.from_url(redis.url)
        store = SharedStore(client, PREFIX, retention=60)
        async with client:
            await publish(store, "short", b'{"a":1}', ttl=1)
            await publish(store, "long", b'{"b":2}', ttl=600)
            await publish(store, "gone", b'{"c":3}', ttl=600)
            await withdraw(store, "gone")
            assert await published(store) == {"short": b'{"a":1}', "long": b'{"b":2}'}
            await publish(store, "short", b'{"a":2}', ttl=600)  # refreshed before it expired
            with trio.fail_after(HANG_GUARD):
                await publish(store, "late", b"{}", ttl=1)
                while await client.exists([store.capabilities_key("late")]):  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert await published(store) == {"short": b'{"a":2}', "long": b'{"b":2}'}
                while "late" in await registered(client):
                    await published(store)
                    await trio.sleep(0.05)
            # A refreshed worker's later expiry kept it in the registry.
            assert await registered(client) == {"short", "long"}
            expiry = await client.zscore(registry_key(store), "short")
            assert expiry is not None
            assert expiry > (await client.time()).timestamp() + 500
