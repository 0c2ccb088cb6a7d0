"""The daemon as a real process (for kill -9, SIGTERM and restart tests), driven from Trio."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from daemon.http.client import http_request
from daemon.simulator import SimulatorConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(rb"listening on (http://\S+) ")
# role=worker serves only health, readiness, backends and metrics
WORKER_READY = re.compile(rb"worker ready, health and metrics on (http://\S+) ")


@dataclass
class ChildProcess:
    """A process the test started: its URL once it said so, and everything it printed."""

    process: trio.Process
    url: str = ""
    output: bytearray = field(default_factory=bytearray)
    exited: trio.Event = field(default_factory=trio.Event)

    def kill(self) -> None:
        """kill -9: no chance to clean up (for a simulator: the GPU box loses power)."""
        self.process.kill()


@dataclass
class DaemonProcess(ChildProcess):
    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        return await self.process.wait()

    def log(self) -> str:
        return self.output[-6000:].decode(errors="replace")


async def _read_output(
    daemon: ChildProcess,
    listening: trio.Event,
    ready: re.Pattern[bytes] = LISTENING,
) -> None:
    """Collect the process's output; `listening` is set once `ready` names its URL."""
    stdout = daemon.process.stdout
    assert stdout is not None
    async with stdout:
        while chunk := await stdout.receive_some(65536):
            daemon.output += chunk
            match = ready.search(daemon.output)
            if match and not listening.is_set():
                daemon.url = match.group(1).decode()
                listening.set()
    daemon.exited.set()
    listening.set()


def _limit_open_files(limits: tuple[int, int]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@asynccontextmanager
async def daemon_process(
    data_dir: Path,
    comfy_url: str | None,
    *settings: str,
    open_files: tuple[int, int] | None = None,
    worker: bool = False,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[DaemonProcess]:
    """`comfy-progress serve` on 127.0.0.1:0 against `comfy_url` (None: no backend, a
    front of the shared queue); `settings` are KEY=VALUE.

    `open_files` is the (soft, hard) RLIMIT_NOFILE the daemon starts with. `worker`:
    role=worker, which serves only health, readiness, backends and metrics (its `url`).
    `env`: variables added to the test's own environment.
    """
    command = [
        sys.executable,
        "-m",
        "daemon.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        *(("--comfy-url", comfy_url) if comfy_url is not None else ()),
        "--data-dir",
        str(data_dir),
        *(arg for setting in settings for arg in ("--set", setting)),
    ]
    process = await trio.lowlevel.open_process(
        command,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=None if open_files is None else partial(_limit_open_files, open_files),
        env={**os.environ, **env} if env is not None else None,
    )
    daemon = DaemonProcess(process)
    listening = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_output, daemon, listening, WORKER_READY if worker else LISTENING)
        try:
            with trio.move_on_after(30):
                await listening.wait()
            if not daemon.url:
                raise RuntimeError(f"the daemon did not start (in 30 s):\n{daemon.log()}")
            yield daemon
        finally:
            with trio.move_on_after(20, shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(15):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                await process.wait()
                await daemon.exited.wait()


SIM_LISTENING = re.compile(rb"simulator listening on (http://[0-9.]+:[0-9]+)")


@dataclass
class SimulatorProcess(ChildProcess):
    # The knobs of an in-test ComfySimulator, driven over its /sim/ endpoints.

    async def control(self, **knobs: object) -> None:
        reply = await http_request(
            "POST",
            f"{self.url}/sim/control",
            headers=(("Content-Type", "application/json"),),
            body=json.dumps(knobs).encode(),
            timeout=10,
        )
        assert reply.status == 200, reply.body

    async def restart(self) -> None:
        """Like a ComfyUI restart: queue and history gone, sockets cut."""
        await self.control(restart=True)

    async def set_manual_steps(self, manual: bool) -> None:
        await self.control(manual_steps=manual)

    async def grant_steps(self, steps: int = 1) -> None:
        await self.control(grant_steps=steps)

    async def reject_connections(self, seconds: float) -> None:
        await self.control(reject_connections=seconds)

    async def wait_for_history(self, prompt_id: str) -> None:
        """Until the prompt has finished there (the simulator answers at that moment)."""
        reply = await http_request("GET", f"{self.url}/sim/history/{prompt_id}/wait", timeout=120)
        assert reply.status == 200, reply.body


def simulator_args(config: SimulatorConfig) -> tuple[str, ...]:
    """The command line for what a test's SimulatorConfig asks (manual mode is a knob)."""
    args = ["--step-time", repr(config.step_time)]
    for node_class in config.hidden_nodes:
        args += ["--hide-node", node_class]
    return tuple(args)


@asynccontextmanager
async def simulator_processes(
    configs: list[SimulatorConfig],
) -> AsyncIterator[list[SimulatorProcess]]:
    """One simulator process per config, each in the mode its config asks."""
    async with contextlib.AsyncExitStack() as stack:
        sims = []
        for config in configs:
            sim = await stack.enter_async_context(simulator_process(*simulator_args(config)))
            if config.manual_steps:
                await sim.set_manual_steps(True)
            sims.append(sim)
        yield sims


@asynccontextmanager
async def simulator_process(*args: str) -> AsyncIterator[SimulatorProcess]:
    """`comfy-progress simulate-comfy` on 127.0.0.1:0 as its own process (for kill -9)."""
    command = [
        sys.executable, "-m", "daemon.cli", "simulate-comfy", "--listen", "127.0.0.1:0", *args
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        command,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sim = SimulatorProcess(process)
    listening = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_output, sim, listening, SIM_LISTENING)
        try:
            with trio.fail_after(30):
                await listening.wait()
            if not sim.url:
                raise RuntimeError(f"the simulator did not start:\n{sim.output.decode()}")
            yield sim
        finally:
            with trio.move_on_after(10, shield=True):
                if process.returncode is None:
                    process.kill()
                await process.wait()
