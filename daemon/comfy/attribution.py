"""Which of our prompts a preview or a progress text belongs to, on one backend.

ComfyUI runs one prompt at a time per server, and only a type 4 preview names
its prompt (FACTS §4). A type 1 preview (a ComfyUI that ignored our
`feature_flags`) goes only to the submitting socket, so it belongs to the
prompt running for us. A type 3 progress text is broadcast to every socket,
whoever submitted the prompt, so it is ours only between our prompt's
`execution_start` (or an `executing` naming it) and its `executing {node:
null}`; those are sent only to the submitter, so a prompt of another client
never opens the window. A new socket forgets the running prompt: it may
have ended while the socket was away (the backend names the one that runs
once a /queue reading says so).

One `PreviewAttribution` per backend connection: a pool of backends keeps one
per backend. Pure state, no I/O.
"""

from __future__ import annotations

from protocol import comfy


class PreviewAttribution:
    """Tracks the prompt running for us on one backend; attributes previews and texts."""

    __slots__ = ("running",)

    def __init__(self) -> None:
        self.running: str | None = None

    def prompt_for(self, event: comfy.ComfyEvent) -> str | None:
        """The prompt a preview or progress text belongs to (None: not ours, or unknown)."""
        if isinstance(event, comfy.PreviewImageWithMetadata):
            return event.prompt_id
        if isinstance(event, comfy.PreviewImage | comfy.ProgressText):
            return self.running
        return None

    def observe(self, event: comfy.ComfyEvent) -> None:
        """Follow the start and end of our prompts, as ComfyUI's frames name them
        (`executing` is targeted too: one naming its prompt says it runs for us).
        After a reconnect the backend says which runs once a /queue reading does
        (ComfyUI's re-sent `executing {node}` names none)."""
        if isinstance(event, comfy.ExecutionStart):
            self.running = event.prompt_id
        elif isinstance(event, comfy.Executing) and event.prompt_id is not None:
            if event.node is not None:
                self.running = event.prompt_id
            elif event.prompt_id == self.running:
                self.running = None

    def reset(self) -> None:
        """A new connection: whatever ended while we were away is unknown."""
        self.running = None
