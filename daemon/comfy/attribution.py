"""Which of our prompts a preview or a progress text belongs to, on one backend.

ComfyUI runs one prompt at a time per server, and only a type 4 preview names
its prompt (FACTS §4). A type 1 preview (a ComfyUI that ignored our
`feature_flags`) goes only to the submitting socket, so it belongs to the
prompt running for us. A type 3 progress text is broadcast to every socket,
whoever submitted the prompt, so it is ours only between our prompt's
`execution_start` and its `executing {node: null}`; both of those are sent
only to the submitter, so a prompt of another client never opens the window.

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

    def observe(self, event: comfy.ComfyEvent, *, resumed_prompt: str | None = None) -> None:
        """Follow the start and end of our prompts.

        `resumed_prompt` is the prompt the caller knows runs for us when ComfyUI
        re-sends `executing {node}` (no prompt_id) to a reconnected socket.
        """
        if isinstance(event, comfy.ExecutionStart):
            self.running = event.prompt_id
        elif isinstance(event, comfy.Executing):
            if event.is_prompt_end:
                if event.prompt_id == self.running:
                    self.running = None
            elif event.prompt_id is None and resumed_prompt is not None:
                self.running = resumed_prompt

    def reset(self) -> None:
        """A new connection: whatever ended while we were away is unknown."""
        self.running = None
