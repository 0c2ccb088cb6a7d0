"""Shared mode: a connection to Redis that goes silent without a reset (a network
split, a dead NAT entry) does not stall a daemon's blocking reads for ever (real
redis-server, real daemon processes, a relay that can go silent, an in-test simulator)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio

from daemon.shared.client import redis_client
from tests.daemon.harness import held_stream, read_events
from tests.daemon.redis_proxy import silent_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import front, last, simulator, worker


async def test_a_front_whose_blocking_read_went_silent_still_ends_its_viewer_s_stream(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        silent_proxy(redis.port) as proxy,
        simulator(manual=True) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "f", proxy.url) as entry,
    ):
        task_id = await generate(entry.url)
        async with held_stream(entry.url, task_id) as stream:
            await stream.until(sampling)
            # The front's reader waits in XREAD BLOCK: its answer will never come.
            proxy.silence()
            sim.grant_steps(10_000)  # the worker ends the task, straight to Redis
            with trio.fail_after(40):  # a read that waits for ever never sees the end
                await stream.to_end()
        assert last(stream.seen)["status"] == "completed", stream.seen[-1].data


async def test_a_worker_whose_connections_went_silent_takes_the_next_task(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        silent_proxy(redis.port) as proxy,
        simulator(manual=False) as sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w", proxy.url, sim.url),
    ):
        first = await generate(entry.url)
        assert last(await read_events(entry.url, first))["status"] == "completed"
        # Idle now, its take loop waits in XREADGROUP BLOCK: no answer will come.
        proxy.silence()
        task_id = await generate(entry.url)
        with trio.fail_after(40):  # a take that waits for ever never runs it
            done = await read_events(entry.url, task_id)
        assert last(done)["status"] == "completed"


def sockets_to(port: int) -> list[socket.socket]:
    """This process's TCP sockets connected to 127.0.0.1:`port` (duplicates: close them)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue  # not a socket (or gone)
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername() == ("127.0.0.1", port):
                found.append(sock)
                continue
        except OSError:
            pass  # not connected, or not an inet socket
        sock.close()
    return found


async def test_every_redis_connection_has_the_kernel_watching_for_a_silent_peer(
    tmp_path: Path,
) -> None:
    # Commands other than blocking reads have no deadline of their own: on a
    # connection gone silent they waited for TCP's retransmission timeout
    # (about 15 minutes), and an idle one was never found dead.
    async with redis_server(tmp_path / "redis") as redis:
        client = redis_client(redis.url, client_name="probe")
        async with client:
            assert await client.ping() == b"PONG"
            opened = sockets_to(redis.port)
            assert opened, "no connection to Redis found"
            for sock in opened:
                with sock:
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                    options = {
                        name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                        for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")
                    }
                    assert options == {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}
                    timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                    assert timeout == 15_000
