"""Runs one prompt and emits its frames in ComfyUI's exact order (FACTS §3).

Per prompt: execution_start, execution_cached{nodes}, then per node in staging
order either the cached path (an output node re-sends `executed`, then
progress_state finished) or progress_state running, executing, the node's ticks
(progress_state, progress, previews), executed for output nodes, progress_state
finished. The prompt ends with execution_success, execution_error or
execution_interrupted; the engine then writes history and sends status and
executing{node: null}.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from daemon.simulator.config import SimulatorConfig
from daemon.simulator.control import SimulatorControls, StepGate
from daemon.simulator.files import FileStore
from daemon.simulator.frames import (
    PNG_FORMAT,
    EncodedPreview,
    preview_frame,
    preview_with_metadata_frame,
    progress_text_frame,
)
from daemon.simulator.graph import CacheEntry, ExecutionList, OutputCache, is_link, signatures
from daemon.simulator.jpeg import encode_jpeg
from daemon.simulator.nodes import NodeDef, NodeEnv, NodeResult
from daemon.simulator.png import encode_png
from daemon.simulator.progress import ProgressRegistry
from daemon.simulator.prompt_queue import QueueItem
from daemon.simulator.validation import full_type_name
from daemon.simulator.values import ImageValue
from daemon.simulator.websocket import Hub


class Interrupted(Exception):
    """The interrupt flag was seen at a progress tick or a node boundary."""


@dataclass(frozen=True)
class Outcome:
    """What the history entry needs from a finished prompt."""

    success: bool
    messages: list[list[Any]]
    history_result: dict[str, Any]


@dataclass(frozen=True)
class _Failure:
    node_id: str
    details: dict[str, Any] | None  # None: interrupted


def format_value(value: Any) -> Any:
    """How ComfyUI reports an input in execution_error.current_inputs."""
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)


def now_ms() -> int:
    """The wall clock in integer milliseconds, as in every `timestamp` field."""
    return int(time.time() * 1000)


class _RunContext:
    """The NodeContext of one node execution."""

    def __init__(self, executor: PromptExecutor, prompt_id: str, node_id: str, prompt: Any):
        self._executor = executor
        self.node_id = node_id
        self.prompt_id = prompt_id
        self.prompt: Mapping[str, Any] = prompt
        self.files = executor.files
        self.config = executor.config

    async def step(self, natural_seconds: float) -> None:
        controls = self._executor.controls
        await self._executor.gate.wait(lambda: controls.step_seconds(natural_seconds))

    def progress(self, value: int, total: int, preview: EncodedPreview | None = None) -> None:
        self._executor.progress_hook(self.prompt_id, self.node_id, value, total, preview)

    async def encode_preview(self, image: ImageValue, image_format: int) -> EncodedPreview:
        return await self._executor.encode_preview(image, image_format)

    def progress_text(self, text: str) -> None:
        # send_progress_text passes no sid, so every socket gets it (s8 bystander).
        self._executor.hub.send_binary(progress_text_frame(self.node_id, text))

    def temp_suffix(self) -> str:
        return self._executor.temp_suffix(self.node_id, self.prompt[self.node_id]["class_type"])


class PromptExecutor:
    """ComfyUI's PromptExecutor: one prompt at a time, messages via the Hub."""

    def __init__(
        self,
        *,
        hub: Hub,
        catalogue: Mapping[str, NodeDef],
        env: NodeEnv,
        files: FileStore,
        controls: SimulatorControls,
        gate: StepGate,
        config: SimulatorConfig,
        rng: random.Random,
    ) -> None:
        self.hub = hub
        self.catalogue = catalogue
        self.env = env
        self.files = files
        self.controls = controls
        self.gate = gate
        self.config = config
        self._rng = rng
        self.cache = OutputCache()
        self.interrupt_requested = False
        self.progress: ProgressRegistry | None = None
        # ComfyUI keeps node objects per (id, class) while prompts keep using them;
        # PreviewImage's random "_temp_xxxxx" lives there (s8 reused "sulmo").
        self._objects: dict[tuple[str, str], str] = {}
        self._previews: dict[tuple[Hashable, int, int, int], EncodedPreview] = {}
        self.encoding = 0  # previews in worker threads; a thread looks "blocked" to Trio

    def reset(self) -> None:
        """Forget caches and per-node objects (restart)."""
        self.cache.clear()
        self._objects.clear()
        self._previews.clear()
        self.interrupt_requested = False
        self.progress = None

    def temp_suffix(self, node_id: str, class_type: str) -> str:
        """The node object's "_temp_" + 5 random letters, made once per object."""
        key = (node_id, class_type)
        if key not in self._objects:
            letters = "".join(self._rng.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
            self._objects[key] = "_temp_" + letters
        return self._objects[key]

    # ------------------------------------------------------------ progress hook

    def progress_hook(
        self, prompt_id: str, node_id: str, value: int, total: int, preview: EncodedPreview | None
    ) -> None:
        """main.py's hook: interrupt check, progress_state (+type 4), progress, type 1."""
        value = min(value, total)
        if self.interrupt_requested:
            self.interrupt_requested = False
            raise Interrupted()
        hub = self.hub
        client_id = hub.client_id
        assert self.progress is not None
        self.progress.update(node_id, value, total)
        with_metadata = self.config.preview_metadata and hub.supports_preview_metadata(client_id)
        if preview is not None and with_metadata:
            metadata = {
                "node_id": node_id,
                "prompt_id": prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
                "image_type": preview.media_type,
            }
            hub.send_binary(preview_with_metadata_frame(preview.data, metadata), client_id)
        progress = {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}
        hub.send_json("progress", progress, client_id)
        if preview is not None and not with_metadata:
            hub.send_binary(preview_frame(preview.data, preview.image_format), client_id)

    async def encode_preview(self, image: ImageValue, image_format: int) -> EncodedPreview:
        # Fit into preview_size, upscaling too (a 64x64 image arrived as 512x512).
        size = self.config.preview_size
        scale = min(size / image.width, size / image.height)
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        key = (image.pattern, width, height, image_format)
        if key not in self._previews:
            # Drawing and encoding take milliseconds: a worker thread, not the event loop.
            self.encoding += 1
            try:
                encoded = await trio.to_thread.run_sync(
                    _encode_preview, image, width, height, image_format
                )
            finally:
                self.encoding -= 1
            if len(self._previews) > 64:
                self._previews.clear()
            self._previews[key] = encoded
        return self._previews[key]

    # ------------------------------------------------------------ one prompt

    def _add_message(
        self, messages: list[list[Any]], event: str, data: dict[str, Any], *, broadcast: bool
    ) -> None:
        data = {**data, "timestamp": now_ms()}
        messages.append([event, data])
        if self.hub.client_id is not None or broadcast:
            self.hub.send_json(event, data, self.hub.client_id)

    async def execute(self, item: QueueItem) -> Outcome:
        """Run a queued prompt to its end (success, error or interrupt)."""
        self.interrupt_requested = False
        prompt, prompt_id, extra_data = item.prompt, item.prompt_id, item.extra_data
        hub = self.hub
        hub.client_id = extra_data.get("client_id") if isinstance(extra_data, dict) else None
        messages: list[list[Any]] = []
        self._add_message(messages, "execution_start", {"prompt_id": prompt_id}, broadcast=False)

        sigs = signatures(prompt, self.catalogue, self.env)
        self.cache.keep_only(set(sigs.values()))
        in_use = {(n, node["class_type"]) for n, node in prompt.items()}
        self._objects = {k: v for k, v in self._objects.items() if k in in_use}
        cached_nodes = [n for n in prompt if self.cache.get(sigs[n]) is not None]
        self.progress = ProgressRegistry(
            prompt_id, lambda snapshot: hub.send_json("progress_state", snapshot, hub.client_id)
        )
        self._add_message(
            messages,
            "execution_cached",
            {"nodes": cached_nodes, "prompt_id": prompt_id},
            broadcast=False,
        )

        run = _PromptRun(self, item, sigs)
        execution = ExecutionList(
            prompt,
            is_cached=lambda n: self.cache.get(sigs[n]) is not None,
            is_output=lambda n: self.catalogue[prompt[n]["class_type"]].output_node,
        )
        for node_id in item.outputs:
            execution.add_node(node_id)
        success = True
        while not execution.is_empty():
            node_id = execution.stage()
            await trio.lowlevel.checkpoint()  # let HTTP requests in between nodes
            failure = await run.execute_node(node_id)
            if failure is not None:
                success = False
                self._handle_error(messages, run, failure)
                break
            execution.complete()
        else:
            self._add_message(
                messages, "execution_success", {"prompt_id": prompt_id}, broadcast=False
            )
        history_result = {
            "outputs": {n: ui["output"] for n, ui in run.ui_outputs.items()},
            "meta": {n: ui["meta"] for n, ui in run.ui_outputs.items()},
        }
        hub.last_node_id = None
        return Outcome(success, messages, history_result)

    def _handle_error(self, messages: list[list[Any]], run: _PromptRun, failure: _Failure) -> None:
        data: dict[str, Any] = {
            "prompt_id": run.item.prompt_id,
            "node_id": failure.node_id,
            "node_type": run.item.prompt[failure.node_id]["class_type"],
            "executed": list(run.executed),
        }
        if failure.details is None:
            self._add_message(messages, "execution_interrupted", data, broadcast=True)
            return
        data.update(failure.details)
        data["current_outputs"] = list(run.item.prompt)
        self._add_message(messages, "execution_error", data, broadcast=False)


class _PromptRun:
    """The node-level state of one prompt execution."""

    def __init__(self, executor: PromptExecutor, item: QueueItem, sigs: dict[str, Hashable]):
        self.ex = executor
        self.item = item
        self.sigs = sigs
        self.values: dict[str, tuple[Any, ...]] = {}
        self.ui_outputs: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []

    def _upstream(self, node_id: str) -> tuple[Any, ...]:
        if node_id in self.values:
            return self.values[node_id]
        entry = self.ex.cache.get(self.sigs[node_id])  # a cached ancestor never staged
        assert entry is not None
        return entry.outputs

    async def execute_node(self, node_id: str) -> _Failure | None:
        ex, hub = self.ex, self.ex.hub
        prompt_id = self.item.prompt_id
        node = self.item.prompt[node_id]
        node_def = ex.catalogue[node["class_type"]]
        progress = ex.progress
        assert progress is not None

        entry = ex.cache.get(self.sigs[node_id])
        if entry is not None:
            if hub.client_id is not None:
                output = entry.ui["output"] if entry.ui is not None else None
                executed = {
                    "node": node_id,
                    "display_node": node_id,
                    "output": output,
                    "prompt_id": prompt_id,
                }
                hub.send_json("executed", executed, hub.client_id)
            if entry.ui is not None:
                self.ui_outputs[node_id] = entry.ui
            progress.finish(node_id)
            self.values[node_id] = entry.outputs
            return None

        progress.start(node_id)
        inputs: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            inputs[name] = self._upstream(value[0])[value[1]] if is_link(value) else value
        if hub.client_id is not None:
            hub.last_node_id = node_id
            executing = {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}
            hub.send_json("executing", executing, hub.client_id)
        try:
            if ex.interrupt_requested:  # before_node_execution()
                ex.interrupt_requested = False
                raise Interrupted()
            fail_at = ex.controls.fail_at
            if fail_at is not None and fail_at in (node_id, node["class_type"]):
                raise RuntimeError(f"simulated failure (fail_at={fail_at})")
            result: NodeResult = await node_def.run(
                _RunContext(ex, prompt_id, node_id, self.item.prompt), inputs
            )
        except Interrupted:
            return _Failure(node_id, None)
        except Exception as exc:  # noqa: BLE001 - a node error becomes execution_error
            return _Failure(
                node_id,
                {
                    "exception_message": f"{exc}\n",
                    "exception_type": full_type_name(type(exc)),
                    "traceback": traceback.format_tb(exc.__traceback__),
                    "current_inputs": {k: [format_value(v)] for k, v in inputs.items()},
                },
            )

        if result.ui:
            self.ui_outputs[node_id] = {
                "meta": {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                },
                "output": result.ui,
            }
            executed = {
                "node": node_id,
                "display_node": node_id,
                "output": result.ui,
                "prompt_id": prompt_id,
            }
            if hub.client_id is not None:
                hub.send_json("executed", executed, hub.client_id)
        ex.cache.put(self.sigs[node_id], CacheEntry(result.outputs, self.ui_outputs.get(node_id)))
        self.values[node_id] = result.outputs
        progress.finish(node_id)
        self.executed.append(node_id)
        return None


def _encode_preview(
    image: ImageValue, width: int, height: int, image_format: int
) -> EncodedPreview:
    rows = image.pattern.rows(width, height)
    if image_format == PNG_FORMAT:
        return EncodedPreview(image_format, encode_png(width, height, rows))
    return EncodedPreview(image_format, encode_jpeg(width, height, rows))
