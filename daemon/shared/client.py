"""The daemon's Redis client, with the kernel watching its connections.

A connection to Redis that goes silent without a reset (a network split, a
host gone) would otherwise hold a command for TCP's retransmission timeout,
about 15 minutes, and an idle connection for ever. Blocking reads give up on
their own (`SILENT_GRACE`, store.py); for every other command the kernel ends
such a connection: keepalive probes after `IDLE_PROBE` seconds of quiet, and
`TCP_USER_TIMEOUT` for data sent but never acknowledged. The command then
fails as a connection error (a RedisError, which every caller retries; coredis
first retries it itself on a new connection) and a connection that cannot be
opened fails after `CONNECT_TIMEOUT`.
"""

from __future__ import annotations

import socket
from typing import Final

import coredis

IDLE_PROBE: Final = 5  # seconds of quiet before the first keepalive probe
PROBE_INTERVAL: Final = 2
PROBES: Final = 3
UNACKNOWLEDGED_MS: Final = 15_000  # sent data unacknowledged this long: the peer is gone
CONNECT_TIMEOUT: Final = 5.0  # coredis' default waits for a connect as long as the kernel does


def keepalive_options() -> dict[int, int | bytes]:
    """TCP-level options (Linux) for each Redis connection; fewer elsewhere."""
    wanted = {
        "TCP_KEEPIDLE": IDLE_PROBE,
        "TCP_KEEPINTVL": PROBE_INTERVAL,
        "TCP_KEEPCNT": PROBES,
        "TCP_USER_TIMEOUT": UNACKNOWLEDGED_MS,
    }
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def redis_client(url: str, *, client_name: str) -> coredis.Redis[bytes]:
    """A client for `url`, named so CLIENT LIST shows which daemon holds which connection."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        url,
        client_name=client_name,
        connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        socket_keepalive_options=keepalive_options(),
    )
    return client
