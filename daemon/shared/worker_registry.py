"""Which workers are live, and what they published their backends can run.

A worker SETs `{p}:caps:{daemon}` with an expiry and, in the same script, puts its
daemon id in the sorted set `{p}:workers` with that expiry (Redis' clock) as score;
stopping, it takes both away. A reader prunes the members whose expiry passed,
reads the rest and MGETs their keys: two round trips, O(workers), whatever else the
keyspace holds (a SCAN of `caps:*` reads every key of it). A key that expired is a
dead worker: its backends drop out with it, as they did when the keys were scanned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from daemon.comfy.capabilities import Capabilities
from daemon.shared.capabilities import capabilities_from_json
from daemon.shared.store import SharedStore, text

# KEYS: the worker's capabilities key, the registry; ARGV: the daemon id, the JSON,
# its TTL in seconds. The score is when the key expires, by the same clock.
PUBLISH: Final = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], t + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: the worker's capabilities key, the registry; ARGV: the daemon id.
WITHDRAW: Final = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: the registry. Drops the members whose key has expired (a worker that
# published again since has a later score, so it stays); returns the others.
LIVE: Final = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', t))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def registry_key(store: SharedStore) -> str:
    return f"{store.prefix}:workers"


async def publish(store: SharedStore, daemon_id: str, body: bytes, *, ttl: int) -> None:
    await store.redis.eval(
        PUBLISH,
        keys=[store.capabilities_key(daemon_id), registry_key(store)],
        args=[daemon_id, body, ttl],
    )


async def withdraw(store: SharedStore, daemon_id: str) -> None:
    await store.redis.eval(
        WITHDRAW, keys=[store.capabilities_key(daemon_id), registry_key(store)], args=[daemon_id]
    )


async def published(store: SharedStore) -> dict[str, bytes]:
    """What every live worker published of its backends, by daemon id."""
    members = await store.redis.eval(LIVE, keys=[registry_key(store)], args=[])
    ids = [text(m) for m in members or ()]  # type: ignore[union-attr, arg-type]
    if not ids:
        return {}
    raws = await store.redis.mget([store.capabilities_key(d) for d in ids])
    # None: expired (or withdrawn) since the registry was read.
    return {d: raw for d, raw in zip(ids, raws, strict=True) if raw is not None}


def by_backend(
    published: dict[str, bytes], parse: Callable[[bytes], dict[str, Capabilities]]
) -> dict[str, Capabilities]:
    """Readings named `daemon/backend`."""
    return {
        f"{daemon_id}/{backend}": reading
        for daemon_id, raw in published.items()
        for backend, reading in parse(raw).items()
    }


async def published_capabilities(store: SharedStore) -> dict[str, Capabilities]:
    """Every live worker's backends' readings, named `daemon/backend`."""
    return by_backend(await published(store), capabilities_from_json)
