"""GET /tasks/{task_id}/preview: a running task's newest preview image.

The body is the image exactly as ComfyUI sent it, with its own content type.
The snapshot's `progress.preview.url` carries the version (`?v=N`) so a browser
fetches each new preview; the answer is always the newest one, with the ETag
naming its version, so a revalidation (If-None-Match) costs a 304.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.http.types import Request, Response, error_response

if TYPE_CHECKING:
    from daemon.images.previews import PreviewStore
    from daemon.shared.service import SharedService
    from daemon.tasks.registry import TaskRegistry


def etag_of(boot: str, version: int) -> str:
    return f'"preview-{boot}-{version}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


class PreviewEndpoint:
    def __init__(
        self, *, registry: TaskRegistry, previews: PreviewStore, shared: SharedService | None
    ) -> None:
        self.registry = registry
        self.previews = previews
        self.shared = shared  # None: only this daemon's tasks

    async def __call__(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        actor = self.registry.get(task_id)
        if actor is None and self.shared is not None:
            return await self._shared(request, task_id)
        preview = self.previews.get(task_id) if actor is not None else None
        if actor is None or actor.is_done() or preview is None:
            return error_response(
                404, "no preview", {"taskId": task_id, "hint": "previews exist while a task runs"}
            )
        etag = etag_of(self.previews.boot, preview.version)
        return self._answer(request, etag, preview.media_type, preview.data)

    async def _shared(self, request: Request, task_id: str) -> Response:
        """A task another daemon runs: the preview its worker put in Redis."""
        shared = self.shared
        assert shared is not None
        preview = await shared.store.load_preview(task_id)
        if preview is None:
            return error_response(
                404, "no preview", {"taskId": task_id, "hint": "previews exist while a task runs"}
            )
        return self._answer(request, preview.etag, preview.media_type, preview.data)

    @staticmethod
    def _answer(request: Request, etag: str, media_type: str, data: bytes) -> Response:
        headers = [
            ("ETag", etag),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if _matches(request.headers.get("if-none-match"), etag):
            return Response(304, headers)
        return Response(200, [("Content-Type", media_type), *headers], data)
