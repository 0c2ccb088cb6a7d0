"""One daemon per data directory: a second `comfy-progress serve` on the same one
stops at once with a clear error, and the first serves on unharmed."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.ops.harness import follow, generate, running_daemon

FAST_SIMULATOR = ("--simulate", "--set", "simulator_step_time=0.01")


async def test_a_second_daemon_on_the_same_data_directory_stops_with_a_clear_error(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, *FAST_SIMULATOR) as first:
        async with running_daemon(tmp_path, *FAST_SIMULATOR, wait_ready=False) as second:
            await second.process.wait()
            assert second.process.returncode == 1
            assert (
                f"the data directory {tmp_path / 'data'} is in use by another comfy-progress"
                f" (pid {first.pid})"
            ) in second.log()
            assert "database is locked" not in second.log()
            assert second.drain() == []  # never READY
        reply = await generate(first.url)  # the first is unharmed
        events, complete = await follow(f"{first.url}/progress/{reply['taskId']}")
        assert complete, events


async def test_the_lock_goes_with_its_daemon_however_it_ends(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, *FAST_SIMULATOR) as first:
        first.process.send_signal(signal.SIGKILL)  # no cleanup of its own
        await first.process.wait()
    async with running_daemon(tmp_path, *FAST_SIMULATOR) as second:
        reply = await generate(second.url)
        events, complete = await follow(f"{second.url}/progress/{reply['taskId']}")
        assert complete, events
