"""ComfySimulator: wires engine, hub, routes and transport; the knobs' Python API."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import trio

from daemon.simulator.config import SimulatorConfig
from daemon.simulator.control import SimulatorControls, StepGate, parse_control
from daemon.simulator.engine import SimulatorEngine
from daemon.simulator.files import FileStore
from daemon.simulator.httptypes import HttpRequest
from daemon.simulator.nodes import build_catalogue
from daemon.simulator.routes import SimulatorRoutes, server_features
from daemon.simulator.transport import HttpTransport
from daemon.simulator.websocket import Hub

logger = logging.getLogger(__name__)

Listen = tuple[str, int] | Sequence[trio.SocketListener]


class ComfySimulator:
    """A ComfyUI stand-in speaking the real protocol. Start it with nursery.start(sim.run, ...)."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.controls = SimulatorControls.from_config(self.config)
        self.gate = StepGate(manual=self.config.manual_steps)
        rng = random.Random(self.config.seed)
        self.files = FileStore(self.config.max_stored_files, self.config.max_input_bytes)
        self.catalogue = build_catalogue()
        self.hub = Hub(
            self.controls,
            rng,
            server_features=server_features(self.config),
            queue_size=self.config.client_queue_size,
            feature_flags=self.config.preview_metadata,
        )
        self.engine = SimulatorEngine(
            config=self.config,
            controls=self.controls,
            gate=self.gate,
            hub=self.hub,
            files=self.files,
            catalogue=self.catalogue,
            rng=rng,
        )
        self.routes = SimulatorRoutes(
            engine=self.engine,
            hub=self.hub,
            files=self.files,
            catalogue=self.catalogue,
            config=self.config,
            control=self,
        )
        self.transport = HttpTransport(
            self.routes.handle,
            reject=self._should_reject,
            max_body=self.config.max_upload_size + 1024 * 1024,
        )
        self.port: int | None = None
        self.restarts = 0

    async def run(
        self, listen: Listen, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; `listen` is (host, port) or listeners. Hands back the port."""
        if isinstance(listen, tuple) and len(listen) == 2 and isinstance(listen[0], str):
            host, port = listen
            listeners: list[trio.SocketListener] = await trio.open_tcp_listeners(port, host=host)
        else:
            listeners = list(listen)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.engine.run_worker)
            await nursery.start(trio.serve_listeners, self.transport.handle_connection, listeners)
            self.port = int(listeners[0].socket.getsockname()[1])
            task_status.started(self.port)

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT once running."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ knobs

    def set_step_time(self, seconds: float | None) -> None:
        """Seconds per progress step for every node; None: each node's own pace."""
        self.controls.step_time = seconds
        self.gate.poke()

    def set_slow_factor(self, factor: float) -> None:
        """Multiply every step's duration."""
        self.controls.slow_factor = factor
        self.gate.poke()

    def set_fail_at(self, target: str | None) -> None:
        """Make nodes with this id or class_type raise (execution_error); None: off."""
        self.controls.fail_at = target

    def go_silent(self, silent: bool = True) -> None:
        """Keep sockets open but deliver nothing (a zombie server), or resume."""
        self.controls.silent = silent

    def drop_websockets(self) -> None:
        """Cut every WebSocket now, without a close frame."""
        self.hub.drop_all()

    def restart(self) -> None:
        """Like a ComfyUI restart: queue, history, cache and temp files gone, sockets cut."""
        self.restarts += 1
        self.engine.restart()

    def reject_connections(self, seconds: float) -> None:
        """For `seconds`, reset (RST) every new request except /sim/*, and cut WebSockets."""
        self.controls.reject_until = trio.current_time() + seconds if seconds > 0 else None
        if seconds > 0:
            self.hub.drop_all()

    def set_manual_steps(self, manual: bool) -> None:
        """Manual mode: progress steps wait for grant_steps() instead of a clock."""
        self.gate.set_manual(manual)

    def grant_steps(self, steps: int = 1) -> None:
        """Let `steps` more progress steps run (manual mode)."""
        self.gate.grant(steps)

    async def wait_for_history(self, prompt_id: str) -> None:
        """Return once the prompt has finished (its history entry exists)."""
        await self.engine.history.wait_for(prompt_id)

    @property
    def waiting_for_step(self) -> bool:
        """True while a step is parked waiting for grant_steps() (manual mode)."""
        return self.gate.parked

    @property
    def encoding_previews(self) -> int:
        """Previews being encoded in worker threads right now (work in progress)."""
        return self.engine.executor.encoding

    def running_progress(self) -> dict[str, dict[str, Any]]:
        """{node_id: {"state", "value", "max"}} of the running prompt ({} when idle)."""
        progress = self.engine.executor.progress
        if self.engine.running_prompt_id is None or progress is None:
            return {}
        return progress.states()

    def apply_control(self, body: Any) -> None:
        """Apply a /sim/control request body (raises ControlError if invalid)."""
        for key, value in parse_control(body).items():
            if key == "step_time":
                self.set_step_time(value)
            elif key == "slow_factor":
                self.set_slow_factor(value)
            elif key == "fail_at":
                self.set_fail_at(value)
            elif key == "manual_steps":
                self.set_manual_steps(value)
            elif key == "go_silent":
                self.go_silent(value)
            elif key == "drop_websockets" and value:
                self.drop_websockets()
            elif key == "restart" and value:
                self.restart()
            elif key == "reject_connections":
                self.reject_connections(value)
            elif key == "grant_steps":
                self.grant_steps(value)

    def state(self) -> dict[str, Any]:
        """GET /sim/state: the knobs and a summary of the simulated server."""
        engine = self.engine
        return {
            "step_time": self.controls.step_time,
            "slow_factor": self.controls.slow_factor,
            "fail_at": self.controls.fail_at,
            "silent": self.controls.silent,
            "manual_steps": self.gate.manual,
            "waiting_for_step": self.gate.parked,
            "rejecting_for": round(self.controls.rejecting_for(), 3),
            "websockets": self.hub.live_count(),
            "clients": sorted(self.hub.sockets),
            "queue_remaining": engine.queue.remaining(),
            "running": (
                {"prompt_id": engine.running_prompt_id, "nodes": self.running_progress()}
                if engine.running_prompt_id is not None
                else None
            ),
            "history_size": len(engine.history),
            "number": engine.number,
            "restarts": self.restarts,
        }

    def _should_reject(self, request: HttpRequest) -> bool:
        if self.routes.is_control_path(request.path):
            return False
        return self.controls.rejecting_for() > 0


async def run_simulator(
    host: str = "127.0.0.1",
    port: int = 8188,
    config: SimulatorConfig | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a simulator on host:port until cancelled (`comfy-progress simulate-comfy`)."""
    sim = ComfySimulator(config)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(sim.run, (host, port))
        logger.info("ComfyUI simulator listening on http://%s:%d", host, bound)
        task_status.started(bound)
