"""One task's subscription to its prompt at one backend.

A task follows its prompt's WebSocket side through this object alone: the
prompt's frames (handed to the task's `deliver` as they are read); its
place in ComfyUI's queue while it waits there (`follow_queue`); whether
the backend's socket came back since the task last looked (frames sent
while it was away are lost, so the task asks /history);
whether the prompt's frames reach us at all (the backend had to give up the
client id the prompt was submitted under); and whether the backend is
connected. The backend hands it out (`ComfyBackend.subscribe`) before the
prompt is submitted, so even the first frame finds its task. HTTP calls stay
on the backend (`backend.http`, `backend.read_queue`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.comfy.queue_places import Follower, QueueReading, Tell
from daemon.comfy.routing import Deliver, Settle

if TYPE_CHECKING:
    from daemon.comfy.backend import ComfyBackend


class PromptSubscription:
    """The frames of one prompt at one backend, and what the task must know of its socket."""

    def __init__(
        self,
        backend: ComfyBackend,
        prompt_id: str,
        *,
        deliver: Deliver,
        settle: Settle | None = None,
    ) -> None:
        """`deliver` gets each of the prompt's events, called from the backend's
        consumer; with `settle`, it only applies them, and `settle` says when the
        frames in hand are all applied. Neither may block or raise
        (daemon/comfy/routing.py)."""
        self.prompt_id = prompt_id
        self.backend_name = backend.name
        self._backend = backend
        self._route = backend.router.open(prompt_id, deliver, settle)
        self._reconnects_seen = backend.reconnected.count
        self._generation = backend.client_generation  # the client id the prompt's frames go to
        self._place: Follower | None = None
        self.closed = False

    # -- the connection

    def is_connected(self) -> bool:
        return self._backend.is_connected()

    async def wait_connected(self) -> None:
        # (Woken a turn at a time with the backend's other subscriptions.)
        while not self._backend.is_connected():
            await self._backend.connection_news.wait()

    async def wait_connection_change(self) -> None:
        """Until the backend's socket opens or closes (woken a turn at a time
        with its other subscriptions, so it may have changed again since)."""
        await self._backend.connection_news.wait()

    def reconnected(self) -> bool:
        """Has the socket reconnected since subscribing, or since this last said so?
        Frames sent while it was away are lost: the task should ask /history."""
        count = self._backend.reconnected.count
        if count == self._reconnects_seen:
            return False
        self._reconnects_seen = count
        return True

    def hears_frames(self) -> bool:
        """False once the backend took a new client id after the prompt was submitted
        (or, before that, after subscribing): ComfyUI sends the prompt's frames to
        the old id, so the task must poll /queue and /history instead."""
        return self._generation == self._backend.client_generation

    # -- what the task tells the backend

    def submitted(self) -> None:
        """The prompt was POSTed under the backend's current client id: it counts
        toward the backend's load until the next `status` frame does."""
        self._backend.note_submitted(self.prompt_id)
        self._generation = self._backend.client_generation

    def held(self) -> None:
        """The prompt is in ComfyUI's queue, submitted before (by us before a restart,
        or by a POST whose answer was lost): it counts toward the backend's load."""
        self._backend.note_held(self.prompt_id)

    def follow_queue(self, tell: Tell) -> None:
        """Hand `tell` every /queue reading of the backend asked for from now on, until
        it returns False or the subscription closes (daemon/comfy/queue_places.py)."""
        if not self.closed and self._place is None:
            self._place = self._backend.queue_places.follow(tell)

    def note_running(self, reading: QueueReading) -> None:
        """`reading` says the prompt runs (we may have missed its start), so the
        `executing` ComfyUI re-sent without a prompt_id when the socket opened, and
        texts and legacy previews, are routed to it (unless the reading was asked
        for before the socket opened: what ran then may have ended)."""
        self._backend.note_running(self.prompt_id, reading)

    def close(self) -> None:
        """Stop routing the prompt's frames here (idempotent)."""
        self.closed = True
        self._backend.router.close(self._route)
        if self._place is not None:
            self._backend.queue_places.unfollow(self._place)
        self._backend.note_gone(self.prompt_id)  # (lost, deleted, or no longer ours to count)
