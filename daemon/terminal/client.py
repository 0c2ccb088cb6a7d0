"""`comfy-progress generate`: submit one prompt, follow its progress, fetch the image.

    POST /generate -> taskId
    GET /progress/{taskId} (SSE) -> progress on stderr, until `complete` or `error-event`
    print the image URL(s) on stdout; with --output, GET the image and save it

The progress stream is followed as a browser's EventSource would: when it
drops before the end, the client waits the server's `retry:` time and asks
again with `Last-Event-ID`, so it gets the current snapshot at once.
Ctrl-C cancels the task on the daemon (DELETE /tasks/{taskId}) and exits 130;
a second Ctrl-C gives up at once.

Exit status: 0 done, 1 the generation failed or the server or network said
no (its message on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from daemon.http.client import (
    ClientResponse,
    HttpClientError,
    StreamedResponse,
    http_request,
    open_stream,
)
from daemon.terminal.display import Display
from protocol.sse import SSEDecoder

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

REQUEST_TIMEOUT: Final = 30.0
DOWNLOAD_CONNECT_TIMEOUT: Final = 30.0
DEFAULT_RETRY: Final = 2.0  # seconds before reconnecting, until the server sets `retry:`
# The least we wait: doubling a `retry: 0` stays 0, and the reconnects would be
# spent in an instant (a restarting daemon has no time to come back).
MIN_RETRY: Final = 0.5
MAX_RETRY: Final = 30.0
# Reconnect this many times in a row without receiving an event, then give up.
MAX_RECONNECTS: Final = 10
# No byte (not even a heartbeat, every 30 s by default) for this long: the
# stream, or an image download, is dead even if the connection looks open.
STREAM_IDLE_TIMEOUT: Final = 90.0
MAX_ERROR_BODY: Final = 64 * 1024
TERMINAL_EVENTS: Final = frozenset({"complete", "error-event"})
# Never a flag: other users can read a command line.
TOKEN_VARIABLE: Final = "COMFY_PROGRESS_API_TOKEN"


class ClientFailure(Exception):
    """The run cannot go on; `str(exc)` is what the user reads."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class StreamIdle(Exception):
    """Nothing arrived on a response body for the idle timeout."""


@dataclass(frozen=True, slots=True)
class Options:
    prompt: str
    server: str = "http://127.0.0.1:8000"
    output: Path | None = None
    workflow: str | None = None
    seed: int | None = None
    params: Mapping[str, Any] | None = None
    token: str | None = None  # the daemon's API token, for POST and DELETE

    def auth_headers(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.token}")] if self.token else []

    def url(self, path: str) -> str:
        """A daemon path as a URL; the server URL may carry a prefix (behind a proxy)."""
        return self.server.rstrip("/") + path

    def request_body(self) -> bytes:
        body: dict[str, Any] = {"prompt": self.prompt, **(self.params or {})}
        if self.workflow is not None:
            body["workflow"] = self.workflow
        if self.seed is not None:
            body["seed"] = self.seed
        return json.dumps(body).encode()


def server_message(response: ClientResponse) -> str:
    """The daemon's `{"error": {"message", "details"}}`, or whatever the body says."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, Mapping) and error.get("message"):
        text = str(error["message"])
        details = error.get("details")
        if details and isinstance(details, str):
            text += f" ({details})"
        return text
    body = response.text().strip()
    return body[:300] if body else "(no message)"


async def streamed_message(response: StreamedResponse) -> str:
    """`server_message` of a streamed answer (an error body: small, read whole up to a cap)."""
    body = bytearray()
    async for chunk in response.chunks:
        body += chunk
        if len(body) > MAX_ERROR_BODY:
            break
    return server_message(ClientResponse(response.status, response.headers, bytes(body)))


def error_text(error: Mapping[str, Any]) -> str:
    """An `error-event`'s error object as one or two lines."""
    text = str(error.get("message") or "the generation failed")
    code = error.get("code")
    if code:
        text += f" [{code}]"
    details = error.get("details")
    if details:
        text += f"\n  {details}"
    return text


class GenerateClient:
    """One `generate` run; `run()` returns the exit status."""

    def __init__(
        self,
        options: Options,
        *,
        display: Display,
        out: TextIO,
        idle_timeout: float = STREAM_IDLE_TIMEOUT,
    ) -> None:
        self.options = options
        self.display = display
        self.out = out
        self.idle_timeout = idle_timeout  # for the progress stream and the download
        self.finished = False  # the task has ended (its terminal event arrived)
        self.interrupted = False
        # Cancelled by the first Ctrl-C: covers following and downloading, not
        # submitting, so a Ctrl-C during POST /generate still learns the task
        # id and can cancel the task.
        self.work = trio.CancelScope()

    async def main(self) -> int:
        status = EXIT_INTERRUPTED  # unless run() returns: a second Ctrl-C cancelled everything
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                if self.display.tty:
                    nursery.start_soon(self._tick)
                status = await self.run()
                nursery.cancel_scope.cancel()
        return status

    async def _watch_signals(
        self, signals: AsyncIterator[int], everything: trio.CancelScope
    ) -> None:
        async for _ in signals:
            if self.interrupted:
                everything.cancel()
                return
            self.interrupted = True
            self.work.cancel()

    async def _tick(self) -> None:
        # Redraws once a second so the clock and the ETA move between events.
        while True:
            await trio.sleep(1.0)
            self.display.tick()

    def print_urls(self, urls: list[str]) -> None:
        try:
            for url in urls:
                print(url, file=self.out, flush=True)
        except BrokenPipeError:
            # Whoever read them left (`| head -0`): the task is done all the same.
            # Our output goes nowhere from now on, so that the exit's flush does not
            # fail on that pipe too.
            with contextlib.suppress(AttributeError, OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.out.fileno())
                os.close(devnull)

    async def run(self) -> int:
        try:
            task_id = await self.submit()
            self.display.message(f"comfy-progress: task {task_id}")
            if self.interrupted:
                return await self.cancel(task_id)
            with self.work:
                final = await self.follow(task_id)
                self.finished = True
                urls = self.image_urls(final)
                self.display.finish()
                self.print_urls(urls)
                if self.options.output is not None:
                    await self.download(urls[0], self.options.output)
                    self.display.message(f"comfy-progress: saved {self.options.output}")
                return EXIT_OK
            # Only a Ctrl-C gets here: it cancelled `work`.
            if self.finished:
                self.display.message("comfy-progress: interrupted")
                return EXIT_INTERRUPTED
            return await self.cancel(task_id)
        except ClientFailure as exc:
            self.display.message(f"comfy-progress: {exc}")
            return exc.status

    # -- steps

    async def submit(self) -> str:
        url = self.options.url("/generate")
        try:
            response = await http_request(
                "POST",
                url,
                headers=[
                    ("Content-Type", "application/json"),
                    ("Accept", "application/json"),
                    *self.options.auth_headers(),
                ],
                body=self.options.request_body(),
                timeout=REQUEST_TIMEOUT,
            )
        except HttpClientError as exc:
            raise ClientFailure(f"cannot reach the daemon: {exc}") from None
        if response.status == 401:
            raise ClientFailure(
                f"the server needs an API token ({server_message(response)}): set {TOKEN_VARIABLE}"
            )
        if response.status != 202:
            raise ClientFailure(
                f"the server refused the request ({response.status}): {server_message(response)}"
            )
        try:
            task_id = response.json()["taskId"]
        except (ValueError, KeyError, TypeError):
            raise ClientFailure(f"unexpected answer from {url}: {response.text()[:300]}") from None
        return str(task_id)

    async def follow(self, task_id: str) -> Mapping[str, Any]:
        """Read the progress stream to its terminal event, reconnecting as needed."""
        url = self.options.url(f"/progress/{task_id}")
        last_id: str | None = None
        retry = DEFAULT_RETRY
        failures = 0
        while True:
            headers = [("Accept", "text/event-stream")]
            if last_id is not None:
                headers.append(("Last-Event-ID", last_id))
            decoder = SSEDecoder()
            why = "the stream ended early"
            try:
                async with open_stream("GET", url, headers=headers) as response:
                    content_type = response.headers.get("content-type", "")
                    if 400 <= response.status < 500:
                        # Asking again will not help (404: the task is unknown,
                        # e.g. finished and forgotten, or the daemon lost it).
                        message = await streamed_message(response)
                        raise ClientFailure(
                            f"cannot follow task {task_id} ({response.status}): {message}"
                        )
                    if response.status != 200:
                        why = f"the server answered {response.status}"
                    elif not content_type.startswith("text/event-stream"):
                        raise ClientFailure(f"{url} is not an event stream ({content_type!r})")
                    else:
                        chunks = response.chunks.__aiter__()
                        while (chunk := await self._next_chunk(chunks)) is not None:
                            for event in decoder.feed(chunk):
                                failures = 0
                                if event.id is not None:
                                    last_id = event.id
                                try:
                                    payload = json.loads(event.data)
                                except ValueError:
                                    continue  # not ours to judge; the next snapshot will do
                                if not isinstance(payload, dict):
                                    continue
                                self.display.update(payload)
                                if event.event in TERMINAL_EVENTS:
                                    return payload
            except HttpClientError as exc:
                why = exc.reason
            except StreamIdle as exc:
                why = str(exc)
            if decoder.retry is not None:
                retry = min(MAX_RETRY, max(MIN_RETRY, decoder.retry / 1000))
            failures += 1
            if failures > MAX_RECONNECTS:
                raise ClientFailure(f"lost the progress stream of task {task_id}: {why}")
            delay = min(MAX_RETRY, retry * 2 ** max(0, failures - 2))
            self.display.note(f"({why}; reconnecting in {delay:.3g} s)")
            await trio.sleep(delay)

    def image_urls(self, final: Mapping[str, Any]) -> list[str]:
        if final.get("status") != "completed":
            error = final.get("error")
            raise ClientFailure(
                "the generation failed: " + error_text(error if isinstance(error, Mapping) else {})
            )
        result = final.get("result")
        result = result if isinstance(result, Mapping) else {}
        paths = result.get("imageUrls") or ([result["imageUrl"]] if result.get("imageUrl") else [])
        if not paths:
            raise ClientFailure("the task completed without an image")
        return [self.options.url(str(path)) for path in paths]

    async def download(self, url: str, target: Path) -> None:
        """GET the image into `target`, through a temporary file: never a half-written image."""
        partial = target.with_name(f".{target.name}.partial")
        try:
            async with open_stream(
                "GET", url, timeout_connect=DOWNLOAD_CONNECT_TIMEOUT
            ) as response:
                if response.status != 200:
                    message = await streamed_message(response)
                    raise ClientFailure(f"cannot download {url} ({response.status}): {message}")
                async with await trio.open_file(partial, "wb") as file:
                    chunks = response.chunks.__aiter__()
                    try:
                        while (chunk := await self._next_chunk(chunks)) is not None:
                            await file.write(chunk)
                    except StreamIdle as exc:
                        raise ClientFailure(f"the download of {url} stalled: {exc}") from None
                if not response.chunks.complete:
                    raise ClientFailure(f"the download of {url} was cut off")
            await trio.Path(partial).replace(target)
        except HttpClientError as exc:
            raise ClientFailure(f"cannot download the image: {exc}") from None
        except OSError as exc:
            raise ClientFailure(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            with trio.CancelScope(shield=True):
                await trio.Path(partial).unlink(missing_ok=True)

    async def _next_chunk(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        """The next chunk of a body, None at its end. A dropped connection can look
        like one that is merely quiet, for hours: StreamIdle after idle_timeout."""
        with trio.move_on_after(self.idle_timeout):
            try:
                return await anext(chunks)
            except StopAsyncIteration:
                return None
        raise StreamIdle(f"nothing received for {self.idle_timeout:g} s")

    async def cancel(self, task_id: str) -> int:
        self.display.message(f"comfy-progress: interrupted; cancelling task {task_id}")
        try:
            response = await http_request(
                "DELETE",
                self.options.url(f"/tasks/{task_id}"),
                headers=self.options.auth_headers(),
                timeout=REQUEST_TIMEOUT,
            )
        except HttpClientError as exc:
            self.display.message(f"comfy-progress: could not cancel the task: {exc}")
            return EXIT_INTERRUPTED
        try:
            message = str(response.json().get("message", ""))
        except (ValueError, AttributeError):
            message = response.text()[:300]
        if response.status >= 400:
            message = server_message(response)
        self.display.message(f"comfy-progress: {message or f'HTTP {response.status}'}")
        return EXIT_INTERRUPTED
