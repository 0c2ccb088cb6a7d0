"""Route ComfyUI events to the task that owns their prompt, over bounded channels.

A route is registered before the prompt is submitted (we choose the
prompt_id), so even the first frame finds its task. The consumer never waits
for a task: when a task's channel is full the event is dropped and the task is
told to reconcile through /history, so one stuck task cannot delay the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from protocol import comfy

log = logging.getLogger(__name__)

ROUTE_BUFFER: Final = 256  # frames a task may lag behind before we drop and reconcile


@dataclass
class Route:
    prompt_id: str
    send: trio.MemorySendChannel[comfy.ComfyEvent]
    on_overflow: Callable[[], None]
    dropped: int = field(default=0)


class PromptRouter:
    """prompt_id -> the channel of the task that owns it."""

    def __init__(self, buffer: int = ROUTE_BUFFER) -> None:
        self._routes: dict[str, Route] = {}
        self._buffer = buffer
        # The prompt ComfyUI is running for us, if we know it; the reconnect
        # re-send `executing {node}` carries no prompt_id and belongs to it.
        self.running_prompt: str | None = None
        self.events_routed = 0

    def open(
        self, prompt_id: str, on_overflow: Callable[[], None] = lambda: None
    ) -> trio.MemoryReceiveChannel[comfy.ComfyEvent]:
        if prompt_id in self._routes:
            raise ValueError(f"prompt {prompt_id} is already routed")
        send, receive = trio.open_memory_channel[comfy.ComfyEvent](self._buffer)
        self._routes[prompt_id] = Route(prompt_id, send, on_overflow)
        return receive

    def close(self, prompt_id: str) -> None:
        route = self._routes.pop(prompt_id, None)
        if route is not None:
            route.send.close()
        if self.running_prompt == prompt_id:
            self.running_prompt = None

    def note_running(self, prompt_id: str) -> None:
        """A /queue reading says this prompt of ours runs (we may have missed its start)."""
        if prompt_id in self._routes:
            self.running_prompt = prompt_id

    @property
    def ours_running(self) -> bool:
        return self.running_prompt is not None and self.running_prompt in self._routes

    def dispatch(self, event: comfy.ComfyEvent, *, prompt_id: str | None = None) -> None:
        """Hand one event to its task, never blocking.

        `prompt_id` names the owner of an event that does not carry one (a
        preview or progress text, attributed by the backend).
        """
        prompt_id = prompt_id or comfy.prompt_id_of(event)
        if isinstance(event, comfy.ExecutionStart):
            self.running_prompt = prompt_id
        elif isinstance(event, comfy.Executing) and prompt_id is None and event.node is not None:
            prompt_id = self.running_prompt
        if prompt_id is None:
            return
        route = self._routes.get(prompt_id)
        if route is not None:
            try:
                route.send.send_nowait(event)
                self.events_routed += 1
            except trio.WouldBlock:
                route.dropped += 1
                log.warning(
                    "task for prompt %s is not keeping up; dropped a %s frame and asked it to "
                    "reconcile",
                    prompt_id,
                    type(event).__name__,
                    extra={"prompt_id": prompt_id},
                )
                route.on_overflow()
            except trio.BrokenResourceError:
                self.close(prompt_id)  # the task is gone
        ended = isinstance(event, comfy.Executing) and event.is_prompt_end
        if ended and self.running_prompt == prompt_id:
            self.running_prompt = None
