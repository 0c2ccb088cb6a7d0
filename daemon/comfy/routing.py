"""Route ComfyUI events to the task that owns their prompt.

A route is registered before the prompt is submitted (we choose the
prompt_id), so even the first frame finds its task. The consumer hands each
event to its task with a plain call, in the consumer's own task: no channel,
no task switch per frame. The task's `deliver` applies it at once and never
awaits or raises (daemon/tasks/actor.py), so one task cannot delay the
others, and nothing queues up that could overflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from protocol import comfy

Deliver: TypeAlias = Callable[[comfy.ComfyEvent], None]


@dataclass(frozen=True, slots=True)
class Route:
    prompt_id: str
    deliver: Deliver


class PromptRouter:
    """prompt_id -> the task that owns it."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        # The prompt ComfyUI is running for us, if we know it; the reconnect
        # re-send `executing {node}` carries no prompt_id and belongs to it.
        self.running_prompt: str | None = None
        self.events_routed = 0

    def open(self, prompt_id: str, deliver: Deliver) -> Route:
        """Hand the prompt's events to `deliver` (which must never block or raise)."""
        if prompt_id in self._routes:
            raise ValueError(f"prompt {prompt_id} is already routed")
        route = self._routes[prompt_id] = Route(prompt_id, deliver)
        return route

    def close(self, route: Route) -> None:
        """Stop routing (idempotent; a newer route for the same prompt stays)."""
        if self._routes.get(route.prompt_id) is route:
            del self._routes[route.prompt_id]
            if self.running_prompt == route.prompt_id:
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
            self.events_routed += 1
            route.deliver(event)
        ended = isinstance(event, comfy.Executing) and event.is_prompt_end
        if ended and self.running_prompt == prompt_id:
            self.running_prompt = None
