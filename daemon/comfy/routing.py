"""Route ComfyUI events to the task that owns their prompt.

A route is registered before the prompt is submitted (we choose the
prompt_id), so even the first frame finds its task. The consumer hands each
event to its task with a plain call, in the consumer's own task: no channel,
no task switch per frame. The task's `deliver` applies it at once and never
awaits or raises (daemon/tasks/actor.py), so one task cannot delay the
others, and nothing queues up that could overflow.

Frames read together arrive as a batch. A route may take a `settle` call
too: then `deliver` only applies (it publishes nothing), and `settle` is
called once the route's frames in hand are applied: at once, unless the
consumer says another frame of the same prompt follows in this batch (then
after the last of them, or at the latest when the batch ends). So a task's
frames read together become one publish, while a frame for another task
waits for nobody's later frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from protocol import comfy

Deliver: TypeAlias = Callable[[comfy.ComfyEvent], None]
Settle: TypeAlias = Callable[[], None]


@dataclass(frozen=True, slots=True, eq=False)  # compared and hashed by identity
class Route:
    prompt_id: str
    deliver: Deliver
    settle: Settle | None = None


class PromptRouter:
    """prompt_id -> the task that owns it."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        # The prompt ComfyUI is running for us, if we know it: named by its own
        # frames (`execution_start`, `executing` with its prompt_id) or by a /queue
        # reading (`note_running`). Forgotten when a socket opens: the prompt may
        # have ended while we were away, and another of ours run now.
        self.running_prompt: str | None = None
        # The `executing {node}` ComfyUI re-sends to a socket that opens while a
        # prompt of our client id runs (FACTS §1, §7): it names no prompt, so it
        # waits for a /queue reading to say which, unless a newer frame makes it stale.
        self._resent: comfy.Executing | None = None
        self.events_routed = 0
        # Routes delivered to whose `settle` waits for a later frame of the batch.
        self._unsettled: dict[Route, None] = {}

    def open(self, prompt_id: str, deliver: Deliver, settle: Settle | None = None) -> Route:
        """Hand the prompt's events to `deliver` (and `settle`, see above; neither
        may block or raise)."""
        if prompt_id in self._routes:
            raise ValueError(f"prompt {prompt_id} is already routed")
        route = self._routes[prompt_id] = Route(prompt_id, deliver, settle)
        return route

    def close(self, route: Route) -> None:
        """Stop routing (idempotent; a newer route for the same prompt stays)."""
        if self._routes.get(route.prompt_id) is route:
            del self._routes[route.prompt_id]
            if self.running_prompt == route.prompt_id:
                self.running_prompt = None

    def socket_opened(self) -> None:
        """A new socket: which prompt runs is unknown until ComfyUI or /queue names it."""
        self.running_prompt = None
        self._resent = None

    def note_running(self, prompt_id: str) -> None:
        """A /queue reading asked for since the socket opened says this prompt of ours
        runs (we may have missed its start): the node re-sent on connect is its."""
        route = self._routes.get(prompt_id)
        if route is None:
            return
        self.running_prompt = prompt_id
        resent, self._resent = self._resent, None
        if resent is not None:
            self._deliver(route, resent, more=False)

    @property
    def holds_resent(self) -> bool:
        """Is a re-sent `executing {node}` waiting for a /queue reading to name its prompt?"""
        return self._resent is not None

    @property
    def ours_running(self) -> bool:
        return self.running_prompt is not None and self.running_prompt in self._routes

    def dispatch(
        self, event: comfy.ComfyEvent, *, prompt_id: str | None = None, more: bool = False
    ) -> None:
        """Hand one event to its task, never blocking.

        `prompt_id` names the owner of an event that does not carry one (a
        preview or progress text, attributed by the backend). `more`: another
        frame naming the same prompt follows in this batch, so the task settles
        later (`end_batch` settles it at the latest).
        """
        prompt_id = prompt_id or comfy.prompt_id_of(event)
        if isinstance(event, comfy.ExecutionStart):
            self.running_prompt, self._resent = event.prompt_id, None
        elif isinstance(event, comfy.Executing) and event.prompt_id is not None:
            self._resent = None  # ComfyUI names what runs now: the re-sent node is stale
            if event.node is not None:
                self.running_prompt = event.prompt_id
        elif isinstance(event, comfy.Executing) and event.node is not None:
            prompt_id = self.running_prompt  # the re-send on connect
            if prompt_id is None:
                self._resent = event  # until a /queue reading says whose it is
                return
        if prompt_id is None:
            return
        route = self._routes.get(prompt_id)
        if route is not None:
            self._deliver(route, event, more=more)
        ended = isinstance(event, comfy.Executing) and event.is_prompt_end
        if ended and self.running_prompt == prompt_id:
            self.running_prompt = None

    def _deliver(self, route: Route, event: comfy.ComfyEvent, *, more: bool) -> None:
        self.events_routed += 1
        route.deliver(event)
        if route.settle is not None:
            if more:
                self._unsettled[route] = None
            else:
                self._unsettled.pop(route, None)
                route.settle()

    def end_batch(self) -> None:
        """The frames read together are all dispatched: settle every route still waiting."""
        while self._unsettled:
            route = next(iter(self._unsettled))
            del self._unsettled[route]
            assert route.settle is not None
            route.settle()
