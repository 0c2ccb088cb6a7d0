"""ComfyUI's HTTP API, as the daemon uses it.

Shapes are parsed by `protocol.comfy`; this module only does the I/O and
turns every transport failure into `BackendUnavailable`, so callers deal with
one exception for "ComfyUI cannot be reached right now".
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import urllib.parse
from collections.abc import Mapping
from typing import Any

import trio

from daemon.http.client import (
    BodySink,
    ClientResponse,
    ConnectionPool,
    HttpClientError,
    ResponseTooLarge,
)
from protocol import comfy
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)


# GET /queue is read as it arrives, keeping only what it needs (comfy.QueueReader):
# its length is bounded by the time it takes (`timeout`), not by a size.
UNLIMITED_QUEUE_BYTES = sys.maxsize


class BackendUnavailable(Exception):
    """ComfyUI did not answer (refused, timed out, 5xx, or garbage)."""


class AnswerTooLarge(BackendUnavailable):
    """ComfyUI's answer is larger than the call takes."""


class OutputMissing(Exception):
    """ComfyUI has no such output file (GET /view answered 404)."""


class OutputTooLarge(Exception):
    """An output file is larger than max_image_bytes (fetching it again cannot help)."""


class ComfyHttp:
    """The HTTP half of one ComfyUI backend."""

    def __init__(self, base_url: str, *, timeout: float, max_image_bytes: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_image_bytes = max_image_bytes
        # One call per task and more (submit, /queue, /history, /view): keep-alive.
        self.pool = ConnectionPool()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
        max_bytes: int = 16 * 1024 * 1024,
        body_sink: BodySink | None = None,
    ) -> ClientResponse:
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers = (*headers, ("Content-Type", "application/json"))
        url = self.base_url + path
        try:
            response = await self.pool.request(
                method,
                url,
                headers=headers,
                body=body,
                timeout=self.timeout,
                max_response_bytes=max_bytes,
                body_sink=body_sink,
            )
        except ResponseTooLarge as exc:
            raise AnswerTooLarge(str(exc)) from None
        except HttpClientError as exc:
            raise BackendUnavailable(str(exc)) from None
        if response.status >= 500 and path != "/prompt":
            raise BackendUnavailable(f"{method} {url} answered {response.status}")
        return response

    def _json(self, response: ClientResponse, what: str) -> Any:
        try:
            return json.loads(response.body)
        except (ValueError, RecursionError):  # (RecursionError: nested too deeply)
            raise BackendUnavailable(
                f"{what}: ComfyUI answered something that is not JSON"
            ) from None

    async def submit(
        self, graph: Mapping[str, Any], *, client_id: str, prompt_id: str
    ) -> comfy.PromptAccepted | comfy.PromptRejected:
        body = comfy.prompt_request(graph, client_id=client_id, prompt_id=prompt_id)
        response = await self._call("POST", "/prompt", json_body=body)
        try:
            return comfy.parse_prompt_reply(response.status, response.body)
        except ProtocolError as exc:
            # ComfyUI 500s on some bodies instead of answering 400; we validate
            # first, so reaching this means ComfyUI itself is in trouble.
            raise BackendUnavailable(f"POST /prompt: {exc}") from None

    async def history(self, prompt_id: str) -> comfy.HistoryEntry | None:
        path = "/history/" + urllib.parse.quote(prompt_id, safe="")
        response = await self._call("GET", path)
        try:
            return comfy.parse_history(self._json(response, "GET /history"), prompt_id)
        except ProtocolError as exc:
            raise BackendUnavailable(f"GET /history: {exc}") from None

    async def queue(self) -> comfy.QueueSnapshot:
        """GET /queue. A long queue is megabytes to hundreds of megabytes (every
        item carries its graph, and one queued from ComfyUI's page the page's
        workflow too): it is decoded as it arrives, keeping only each item's
        number and prompt id, so no cap on the whole answer applies (one on an
        item does), and streams and frames run between two chunks."""
        reader = comfy.QueueReader()
        try:
            response = await self._call(
                "GET", "/queue", body_sink=reader.feed, max_bytes=UNLIMITED_QUEUE_BYTES
            )
            if response.status != 200:
                raise BackendUnavailable(f"GET /queue answered {response.status}")
            return reader.end()
        except ProtocolError as exc:
            raise BackendUnavailable(f"GET /queue: {exc}") from None

    async def view(self, image: comfy.ImageRef) -> bytes:
        query = urllib.parse.urlencode(
            {"filename": image.filename, "subfolder": image.subfolder, "type": image.type}
        )
        try:
            response = await self._call("GET", f"/view?{query}", max_bytes=self.max_image_bytes)
        except AnswerTooLarge:
            raise OutputTooLarge(
                f"ComfyUI's {image.type} image {image.filename!r} is larger than"
                f" max_image_bytes ({self.max_image_bytes} bytes)"
            ) from None
        if response.status == 404:
            raise OutputMissing(f"ComfyUI has no {image.type} image {image.filename!r}")
        if response.status != 200:
            raise BackendUnavailable(f"GET /view answered {response.status}")
        return response.body

    async def interrupt(self, prompt_id: str) -> None:
        # With a prompt_id ComfyUI interrupts only that prompt, and only if it runs.
        await self._call("POST", "/interrupt", json_body={"prompt_id": prompt_id})

    async def delete_queued(self, prompt_id: str) -> None:
        await self._call("POST", "/queue", json_body={"delete": [prompt_id]})

    async def upload_image(self, name: str, data: bytes, content_type: str) -> dict[str, Any]:
        """POST /upload/image (multipart); returns ComfyUI's {name, subfolder, type}."""
        boundary = "comfy-progress-" + secrets.token_hex(12)
        safe_name = name.replace('"', "").replace("\r", "").replace("\n", "")
        parts = [
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="image"; filename="{safe_name}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode(),
            data,
            (
                f"\r\n--{boundary}\r\n"
                'Content-Disposition: form-data; name="overwrite"\r\n\r\n'
                f"true\r\n--{boundary}--\r\n"
            ).encode(),
        ]
        # Copying a 20 MiB image takes over 10 ms; bytes.join does it without the GIL.
        body = await trio.to_thread.run_sync(b"".join, parts)
        response = await self._call(
            "POST",
            "/upload/image",
            body=body,
            headers=(("Content-Type", f"multipart/form-data; boundary={boundary}"),),
        )
        # Freeing the copy costs milliseconds (munmap): not on the loop either.
        last_reference = [body]
        del body
        await trio.to_thread.run_sync(last_reference.clear)
        if response.status != 200:
            raise BackendUnavailable(f"POST /upload/image answered {response.status}")
        reply = self._json(response, "POST /upload/image")
        if not isinstance(reply, dict) or not isinstance(reply.get("name"), str):
            raise BackendUnavailable("POST /upload/image: unexpected reply")
        return reply

    async def object_info(self, node_class: str) -> Mapping[str, Any] | None:
        """GET /object_info/{class}: its definition, or None when ComfyUI has no such node."""
        path = "/object_info/" + urllib.parse.quote(node_class, safe="")
        response = await self._call("GET", path)
        if response.status != 200:
            raise BackendUnavailable(f"GET {path} answered {response.status}")
        reply = self._json(response, f"GET {path}")
        if not isinstance(reply, dict):
            raise BackendUnavailable(f"GET {path}: unexpected reply")
        info = reply.get(node_class)
        return info if isinstance(info, dict) else None

    async def probe(self) -> bool:
        """Is ComfyUI answering HTTP at all? (GET /prompt is cheap.)"""
        try:
            response = await self._call("GET", "/prompt")
        except BackendUnavailable:
            return False
        return response.status == 200
