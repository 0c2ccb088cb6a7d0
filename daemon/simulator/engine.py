"""The simulated server: /prompt submission, the queue worker, interrupts, restart.

Transport-free: routes call these methods with parsed JSON; frames leave
through the Hub. One worker runs prompts one at a time, like ComfyUI's
prompt_worker thread.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import Any

import trio

from daemon.simulator.config import SimulatorConfig
from daemon.simulator.control import SimulatorControls, StepGate
from daemon.simulator.executor import Outcome, PromptExecutor
from daemon.simulator.files import FileStore
from daemon.simulator.history import History
from daemon.simulator.nodes import NodeDef, NodeEnv
from daemon.simulator.prompt_queue import PromptQueue, QueueItem
from daemon.simulator.validation import PromptCrash, validate_prompt
from daemon.simulator.websocket import Hub

# extra_data keys ComfyUI moves out of the queue item (never echoed back).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class SimulatorEngine:
    """Queue, history, execution and the global `number` counter."""

    def __init__(
        self,
        *,
        config: SimulatorConfig,
        controls: SimulatorControls,
        gate: StepGate,
        hub: Hub,
        files: FileStore,
        catalogue: Mapping[str, NodeDef],
        rng: random.Random,
    ) -> None:
        self.config = config
        self.hub = hub
        self.files = files
        self.catalogue = catalogue
        self.env = NodeEnv(config.checkpoints, files)
        self._rng = rng
        self.number = 0
        self.queue = PromptQueue(self._queue_updated)
        self.history = History(config.max_history)
        self.executor = PromptExecutor(
            hub=hub,
            catalogue=catalogue,
            env=self.env,
            files=files,
            controls=controls,
            gate=gate,
            config=config,
            rng=rng,
        )
        self._run_scope: trio.CancelScope | None = None
        self.running_prompt_id: str | None = None
        hub.queue_info = self.queue_info

    # ------------------------------------------------------------ state

    def queue_info(self) -> dict[str, Any]:
        """GET /prompt, and the `status` frame's data.status."""
        return {"exec_info": {"queue_remaining": self.queue.remaining()}}

    def _queue_updated(self) -> None:
        self.hub.send_json("status", {"status": self.queue_info()})

    def _new_prompt_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    # ------------------------------------------------------------ POST /prompt

    def submit(self, json_data: Any) -> tuple[int, dict[str, Any]]:
        """POST /prompt with a parsed body: (HTTP status, JSON reply).

        Raises PromptCrash where ComfyUI's handler crashes (a bare 500).
        """
        if isinstance(json_data, list):
            json_data = {}  # `"prompt" in [...]` is False: counted, then no_prompt
        elif isinstance(json_data, str) and not any(
            word in json_data for word in ("number", "front", "prompt")
        ):
            json_data = {}
        elif not isinstance(json_data, dict):
            raise PromptCrash(f"the body is a {type(json_data).__name__}")

        number: int | float
        if "number" in json_data:
            try:
                number = float(json_data["number"])
            except (TypeError, ValueError):
                raise PromptCrash("number is not a number") from None
        else:
            # Every POST counts, rejected ones included (s3 used up 2..9).
            number = self.number
            if json_data.get("front"):
                number = -number
            self.number += 1

        if "prompt" not in json_data:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return 400, {"error": error, "node_errors": {}}

        prompt = json_data["prompt"]
        chosen = self.config.prompt_ids and "prompt_id" in json_data
        prompt_id = str(json_data["prompt_id"]) if chosen else self._new_prompt_id()
        partial = json_data.get("partial_execution_targets")
        valid = validate_prompt(prompt, partial, self.catalogue, self.env)
        extra_data: Any = json_data.get("extra_data", {})
        if "client_id" in json_data:
            try:
                extra_data["client_id"] = json_data["client_id"]
            except TypeError:
                raise PromptCrash("extra_data is not an object") from None
        if not valid.ok:
            return 400, {"error": valid.error, "node_errors": valid.node_errors}
        sensitive: dict[str, Any] = {}
        if isinstance(extra_data, dict):
            for key in SENSITIVE_EXTRA_DATA_KEYS:
                if key in extra_data:
                    sensitive[key] = extra_data.pop(key)
        self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, valid.outputs, sensitive))
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors}

    # ------------------------------------------------------------ queue control

    def interrupt(self, prompt_id: Any) -> None:
        """POST /interrupt: a truthy prompt_id interrupts only if it is running."""
        if prompt_id and not any(item.prompt_id == prompt_id for item in self.queue.running()):
            return
        self.executor.interrupt_requested = True

    def delete_pending(self, prompt_ids: Any) -> None:
        """POST /queue {"delete": [...]}: pending prompts only."""
        for prompt_id in prompt_ids:
            self.queue.delete(prompt_id)

    def restart(self) -> None:
        """Like a ComfyUI process restart: state gone, sockets cut, no frames sent."""
        if self._run_scope is not None:
            self._run_scope.cancel()
        self.queue.forget()
        self.history.clear()
        self.executor.reset()
        self.number = 0
        self.files.clear("temp")  # ComfyUI empties temp/ at start-up
        self.hub.client_id = None
        self.hub.last_node_id = None
        self.running_prompt_id = None
        self.hub.drop_all()

    # ------------------------------------------------------------ the worker

    async def run_worker(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Execute queued prompts forever, one at a time."""
        task_status.started()
        while True:
            item, task_id = await self.queue.get()
            self.running_prompt_id = item.prompt_id
            outcome: Outcome | None = None
            with trio.CancelScope() as scope:
                self._run_scope = scope
                outcome = await self.executor.execute(item)
            self._run_scope = None
            self.running_prompt_id = None
            if outcome is None:
                continue  # cancelled by restart(): the prompt vanished with the process
            self.queue.finish(task_id)
            status = {
                "status_str": "success" if outcome.success else "error",
                "completed": outcome.success,
                "messages": outcome.messages,
            }
            # History first: when executing{null} arrives, /history/P already answers.
            self.history.store(item, status, outcome.history_result)
            self._queue_updated()
            if self.hub.client_id is not None:
                done = {"node": None, "prompt_id": item.prompt_id}
                self.hub.send_json("executing", done, self.hub.client_id)
