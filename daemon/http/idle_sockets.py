"""Tasks asleep until their socket has input, or until someone wakes them.

An open SSE stream spends nearly all its life asleep: it must wake when the
client sends something (in practice: leaves, which reads as EOF) or when the
fan-out hands it work. Trio's `wait_readable` inside a cancel scope does
both, but holds four coroutine frames, a closure and a cancel scope per
stream, about 2 KiB each at 5,000 streams. Here every sleeping socket sits in
one epoll set of our own; one watcher task waits on that set's descriptor
(through Trio, so the event loop sees it) and reschedules the sleeper whose
socket became readable. A sleeper costs one frame and one registration.

Linux only (epoll), like the daemon. A socket should be closed by its own
sleeper's task once awake; one closed under its sleeper is noticed when its
number is reused, and that sleeper then gets `trio.ClosedResourceError`.
"""

from __future__ import annotations

import contextlib
import functools
import select

import trio
from outcome import Error
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

# Input, EOF (the peer half-closed or left) and errors all wake a sleeper.
_WAKE_ON = select.EPOLLIN | select.EPOLLRDHUP
_MAX_EVENTS = 1024  # per look; more are read on the next look, at once


class IdleSockets:
    """One epoll set for the sockets of sleeping tasks, and the task that watches it."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._sleepers: dict[int, Task] = {}

    @property
    def sleeping(self) -> int:
        return len(self._sleepers)

    async def sleep(self, fd: int) -> None:
        """Sleep until `fd` has input (or EOF, or an error) or `wake(fd)` is called.

        Which it was, the caller learns by reading. Cancellable; one sleeper per fd."""
        epoll = self._epoll
        if epoll is None:
            epoll = self._epoll = select.epoll()
            trio.lowlevel.spawn_system_task(self._watch, epoll, name="idle sockets")
        if fd in self._sleepers:
            self._evict_if_closed(epoll, fd)
        epoll.register(fd, _WAKE_ON)
        self._sleepers[fd] = current_task()
        await wait_task_rescheduled(functools.partial(self._abort, fd))

    def _evict_if_closed(self, epoll: select.epoll, fd: int) -> None:
        """Someone sleeps on `fd` already: an error, unless that socket was closed
        under its sleeper (the kernel then dropped it from the set, and `fd` is a
        new socket's number). That sleeper would never wake: it gets the error
        Trio gives a task whose socket is closed while it waits."""
        try:
            epoll.modify(fd, _WAKE_ON)  # the same mask: a no-op if still registered
        except FileNotFoundError:
            stale = self._sleepers.pop(fd)
            reschedule(stale, Error(trio.ClosedResourceError("the socket was closed")))
            return
        raise trio.BusyResourceError("another task is already asleep on this socket")

    def _abort(self, fd: int, _: object) -> Abort:
        self._forget(fd)  # cancelled in its sleep
        return Abort.SUCCEEDED

    def wake(self, fd: int) -> None:
        """Wake the task asleep on `fd` (nothing if none is)."""
        task = self._forget(fd)
        if task is not None:
            reschedule(task)

    def _forget(self, fd: int) -> Task | None:
        task = self._sleepers.pop(fd, None)
        if task is not None and self._epoll is not None:
            # (A closed fd has already left the set.)
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        return task

    async def _watch(self, epoll: select.epoll) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, _MAX_EVENTS):
                    task = self._forget(fd)
                    if task is not None:
                        reschedule(task)
        finally:
            # The run is ending (system tasks are cancelled last): nobody sleeps here any more.
            self._epoll = None
            self._sleepers.clear()
            epoll.close()
