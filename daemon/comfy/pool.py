"""Several ComfyUI backends as one pool.

Each backend keeps its own WebSocket, client id, reconnect loop and counters
(`ComfyBackend`). The pool adds what concerns them together: on every
connect it reads what the backend can run (`capabilities`), and removes the
prompts the daemon gave up on there, and while it is connected removes them
at once (a task that was resubmitted elsewhere must not leave a second image
behind); and it fires `changed` whenever a
backend's load, connection or reading changed, which is when the dispatcher
looks again. The prompts to remove are also told to an `AbandonedLog` (the
journal), and given back at start (`restore_abandoned`): a restart before the
backend is back does not leave them running there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, Protocol

import trio

from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.capabilities import Capabilities, Needs, read_capabilities
from daemon.comfy.http_api import BackendUnavailable
from daemon.signals import Signal

log = logging.getLogger(__name__)

READ_RETRY_DELAY: Final = 2.0  # seconds between capability readings that failed
LEGACY_CLIENT_ID_FILE: Final = "client-id"  # one backend, before pools


def client_id_file(data_dir: Path, url: str) -> Path:
    """Each backend's client id lives in its own file, named after its URL."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return data_dir / "client-ids" / digest


def adopt_legacy_client_id(data_dir: Path, url: str) -> None:
    """A data directory from a one-backend daemon: its client id goes to the first backend,
    so tasks it submitted before the upgrade still hear their prompts."""
    legacy = data_dir / LEGACY_CLIENT_ID_FILE
    target = client_id_file(data_dir, url)
    if legacy.is_file() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        legacy.replace(target)


class AbandonedLog(Protocol):
    """Where the prompts still to remove are kept across restarts (the journal)."""

    def record_abandoned(self, backend: str, prompt_id: str) -> None: ...

    def forget_abandoned(self, backend: str, prompt_id: str) -> None: ...


class BackendPool:
    """The configured backends, in order, and what they can run."""

    def __init__(
        self,
        backends: Sequence[ComfyBackend],
        *,
        classes: Iterable[str],
        allow_empty: bool = False,
        abandoned_log: AbandonedLog | None = None,
    ) -> None:
        """`allow_empty`: a front daemon of the shared queue runs no backend of its own.
        `abandoned_log` hears of every prompt to remove, and of its removal."""
        if not backends and not allow_empty:
            raise ValueError("a pool needs at least one backend")
        self.backends = list(backends)
        self.classes = frozenset(classes)  # every node class a workflow uses
        self.changed = Signal()
        self.capabilities: dict[str, Capabilities] = {}  # by backend name; the last reading
        self._abandoned: dict[str, set[str]] = {b.name: set() for b in backends}
        self._abandoned_more = {b.name: Signal() for b in backends}
        self._abandoned_log = abandoned_log
        self._first_readings = trio.Event()

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str],
        settings: BackendSettings,
        *,
        data_dir: Path | None,
        classes: Iterable[str],
        allow_empty: bool = False,
        abandoned_log: AbandonedLog | None = None,
    ) -> BackendPool:
        backends = []
        for index, url in enumerate(urls):
            id_file = None
            if data_dir is not None:
                if index == 0:
                    adopt_legacy_client_id(data_dir, url)
                id_file = client_id_file(data_dir, url)
            backend_settings = dataclasses.replace(settings, url=url)
            backends.append(ComfyBackend(backend_settings, client_id_file=id_file))
        return cls(backends, classes=classes, allow_empty=allow_empty, abandoned_log=abandoned_log)

    # -- views

    def get(self, name: str | None) -> ComfyBackend | None:
        return next((b for b in self.backends if b.name == name), None)

    def connected(self) -> list[ComfyBackend]:
        return [b for b in self.backends if b.is_connected()]

    def takes_work(self, backend: ComfyBackend) -> bool:
        """Connected, read, and its load known: the dispatcher may give it a task."""
        return (
            backend.is_connected()
            and backend.name in self.capabilities
            and backend.queue_remaining is not None
        )

    def can_run(self, backend: ComfyBackend, needs: Needs) -> bool:
        reading = self.capabilities.get(backend.name)
        return reading is not None and reading.missing(needs) is None

    def why_nowhere(self, needs: Needs) -> dict[str, str] | None:
        """When every backend read so far lacks something `needs`: what each one lacks.
        None when some backend can run it, or none was ever read (then requests wait)."""
        if not self.capabilities:
            return None
        reasons: dict[str, str] = {}
        for backend in self.backends:
            reading = self.capabilities.get(backend.name)
            if reading is None:
                continue
            missing = reading.missing(needs)
            if missing is None:
                return None
            reasons[backend.name] = missing
        return reasons

    def abandon(self, backend: ComfyBackend, prompt_id: str) -> None:
        """The daemon gave up on this prompt there: remove it now if the backend is
        connected, else when it is back."""
        self._abandoned[backend.name].add(prompt_id)
        if self._abandoned_log is not None:
            self._abandoned_log.record_abandoned(backend.name, prompt_id)
        self._abandoned_more[backend.name].fire()

    def restore_abandoned(self, prompts: Iterable[tuple[str, str]]) -> int:
        """(backend URL, prompt id) pairs an earlier run gave up on: removed once their
        backend is connected. Those of a backend not configured now stay in the log
        (it ages them out). How many were taken."""
        taken = 0
        for name, prompt_id in prompts:
            if name in self._abandoned:
                self._abandoned[name].add(prompt_id)
                self._abandoned_more[name].fire()  # (handed over after the connect, maybe)
                taken += 1
        return taken

    def abandoned(self, backend: ComfyBackend) -> frozenset[str]:
        """Prompts still to remove from this backend."""
        return frozenset(self._abandoned[backend.name])

    # -- the services

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every backend's consumer and its tender; ready once each has tried to connect.

        The first attempts run side by side: one after another, N ComfyUIs that do
        not answer held the start (and READY=1) for N x comfy_connect_timeout."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:
                for backend in self.backends:
                    starting.start_soon(self._start, nursery, backend)
            task_status.started()

    async def _start(self, nursery: trio.Nursery, backend: ComfyBackend) -> None:
        """Once its first attempt to connect is over, the backend lives on in `nursery`."""
        await nursery.start(backend.run)
        nursery.start_soon(self._tend, backend)
        nursery.start_soon(self._forward, backend)

    async def _forward(self, backend: ComfyBackend) -> None:
        while True:
            await backend.queue_changed.wait()
            self.changed.fire()

    async def _tend(self, backend: ComfyBackend) -> None:
        """On every connect: read what it can run, then clean what we left there."""
        while True:
            await backend.wait_connected()
            await self._read(backend)
            await self._clean_abandoned(backend)
            self.changed.fire()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._clean_while_connected, backend)
                while backend.is_connected():
                    await backend.connected_changed.wait()
                nursery.cancel_scope.cancel()
            self.changed.fire()

    async def _read(self, backend: ComfyBackend) -> None:
        while backend.is_connected():
            try:
                reading = await read_capabilities(backend.http, self.classes)
            except BackendUnavailable as exc:
                log.warning(
                    "cannot read what %s can run: %s", backend.name, exc,
                    extra={"backend": backend.name},
                )  # fmt: skip
                await trio.sleep(READ_RETRY_DELAY)
                continue
            first = backend.name not in self.capabilities
            self.capabilities[backend.name] = reading
            if reading.absent:
                log.info(
                    "%s lacks node class(es) %s", backend.name, ", ".join(sorted(reading.absent)),
                    extra={"backend": backend.name},
                )  # fmt: skip
            if first and len(self.capabilities) == len(self.backends):
                self._first_readings.set()
            return

    async def wait_all_read(self) -> None:
        """Until every backend has been read once (never, if one never answers)."""
        await self._first_readings.wait()

    async def _clean_while_connected(self, backend: ComfyBackend) -> None:
        """Prompts given up on while the backend is connected (a POST whose answer was
        lost, and nobody could say whether it arrived) go at once: no reconnect
        would come to remove them. A removal that failed is tried again."""
        name = backend.name
        while True:
            if self._abandoned[name]:
                await trio.sleep(READ_RETRY_DELAY)
            else:
                await self._abandoned_more[name].wait()
            await self._clean_abandoned(backend)
            self.changed.fire()

    async def _clean_abandoned(self, backend: ComfyBackend) -> None:
        prompts = self._abandoned[backend.name]
        if not prompts:
            return
        try:
            queue = await backend.http.queue()
            for prompt_id in sorted(prompts):
                position = queue.position_of(prompt_id)
                if position is not None and position.running:
                    await backend.http.interrupt(prompt_id)
                elif position is not None:
                    await backend.http.delete_queued(prompt_id)
                if position is not None:
                    log.info(
                        "removed prompt %s from %s: its task gave it up (cancelled or resubmitted)",
                        prompt_id, backend.name,
                        extra={"backend": backend.name, "prompt_id": prompt_id},
                    )  # fmt: skip
                prompts.discard(prompt_id)
                if self._abandoned_log is not None:
                    self._abandoned_log.forget_abandoned(backend.name, prompt_id)
        except BackendUnavailable as exc:
            log.warning(
                "cannot remove abandoned prompts from %s yet: %s", backend.name, exc,
                extra={"backend": backend.name},
            )  # fmt: skip
