"""max_connections against the open-file limit: the daemon as a real process under `ulimit -n`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from daemon.ops.file_limit import RESERVED_FILES, connections_that_fit
from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.daemon.http.helpers import H11Client
from tests.daemon.process import daemon_process


@asynccontextmanager
async def simulator() -> AsyncIterator[ComfySimulator]:
    sim = ComfySimulator(SimulatorConfig(step_time=0.01))
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run, ("127.0.0.1", 0))
        yield sim
        nursery.cancel_scope.cancel()


def soft_open_files(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
    assert match is not None, limits
    return int(match.group(1))


def test_connections_that_fit_leave_the_reserve_free() -> None:
    assert connections_that_fit(10_000, 65_536) == 10_000
    assert connections_that_fit(10_000, 1024) == 1024 - RESERVED_FILES
    assert connections_that_fit(10_000, 10) == 1


async def test_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    async with (
        simulator() as sim,
        daemon_process(tmp_path, sim.url, open_files=(256, 4096)) as daemon,
    ):
        assert soft_open_files(daemon.process.pid) == 4096
    assert "max_connections 10000 does not fit the open-file limit 4096" in daemon.log()


async def test_max_connections_is_clamped_to_the_open_file_limit(tmp_path: Path) -> None:
    hard = RESERVED_FILES + 20
    fitting = hard - RESERVED_FILES
    async with (
        simulator() as sim,
        daemon_process(
            tmp_path, sim.url, "header_read_timeout=30", open_files=(hard, hard)
        ) as daemon,
    ):
        assert f"serving at most {fitting} connections" in daemon.log()
        host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
        async with AsyncExitStack() as held:
            # Idle connections up to the limit: each holds a descriptor in the daemon.
            for _ in range(fitting):
                await held.enter_async_context(await trio.open_tcp_stream(host, int(port)))
            # The next one is refused with a 503, not left waiting in the backlog.
            async with await trio.open_tcp_stream(host, int(port)) as extra:
                head = await H11Client(extra).read_head()
            assert head.status_code == 503
    assert "accept() failed" not in daemon.log()


async def test_a_flood_past_max_connections_leaves_the_reserve_free(tmp_path: Path) -> None:
    hard = RESERVED_FILES + 20
    fitting = hard - RESERVED_FILES
    async with (
        simulator() as sim,
        daemon_process(
            tmp_path, sim.url, "header_read_timeout=30", open_files=(hard, hard)
        ) as daemon,
    ):
        host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
        async with AsyncExitStack() as held:
            for _ in range(fitting):
                await held.enter_async_context(await trio.open_tcp_stream(host, int(port)))
            # More connections past the limit than the reserve, all held open: each
            # one answered 503 kept its descriptor while the daemon lingered.
            flood = RESERVED_FILES + 20
            for _ in range(flood):
                await held.enter_async_context(await trio.open_tcp_stream(host, int(port)))
            # Until the daemon took them all, or ran out of descriptors doing so
            # (the whole output: log() is its end only).
            with trio.fail_after(30):
                while daemon.output.count(b"connection limit (") < flood:
                    if b"accept() failed" in daemon.output:
                        break
                    await trio.sleep(0.01)
    assert b"accept() failed" not in daemon.output
