"""Where our prompts stand in one ComfyUI's queue: one reader for all of them.

Every prompt we POSTed waits in ComfyUI's queue until it runs, and its task
shows how many prompts are ahead. One task per backend (`QueuePlaces.run`)
reads GET /queue when the queue changed (a `status` frame, one of our
submissions), at most once per `interval` (more for a long queue: reading
one costs, see `ComfyBackend.queue_read_spacing`), and at least every
`SAFETY_POLL` seconds in case a frame was lost. It tells every prompt
followed then the reading: `PLACES_PER_TURN` at a time, with a checkpoint
between turns. With thousands of prompts held there, one change of the
queue moves every place: thousands of publishes, which must not stall
every stream at once (one watcher task per prompt did: 40-60 ms at each
change with 2,000 held).

A prompt is told only readings asked for after it began to be followed (a
reading from before its submission cannot know it); its `tell` applies the
reading and never blocks or raises, and returns False once the prompt has
left the queue (it is told nothing more then).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from daemon.comfy.http_api import BackendUnavailable
from daemon.signals import Signal
from protocol import comfy

if TYPE_CHECKING:
    from daemon.comfy.backend import ComfyBackend

PLACES_PER_TURN: Final = 100  # told between two checkpoints (a publish each: 5-13 ms a turn)
SAFETY_POLL: Final = 10.0  # seconds: read at least this often while a prompt is followed

_moments = itertools.count(1)


def moment() -> int:
    """A number above every one handed out before: it orders two events exactly,
    where Trio's clock may read the same for both (coarse, or a test's mock clock
    standing still while tasks run)."""
    return next(_moments)


@dataclass(frozen=True, slots=True)
class QueueReading:
    """One GET /queue answer and when it was asked for: Trio time (for spacing
    readings) and the `moment()` (for ordering it against a submission)."""

    taken_at: float
    started: int
    snapshot: comfy.QueueSnapshot


Tell = Callable[[QueueReading], bool]


@dataclass(eq=False, slots=True)  # compared and hashed by identity
class Follower:
    since: int  # the moment() it began to be followed
    tell: Tell


class QueuePlaces:
    """The prompts followed at one backend, and the task that tells them readings."""

    def __init__(self, backend: ComfyBackend, interval: float) -> None:
        self._backend = backend
        self.interval = interval  # the least time between two readings
        self._followers: dict[Follower, None] = {}  # in the order they came
        self._newcomers = Signal()  # fires when a prompt begins to be followed
        self.places_told = 0  # (for tests and curiosity)

    def __len__(self) -> int:
        return len(self._followers)

    def follow(self, tell: Tell) -> Follower:
        """Tell `tell` every reading asked for from now on, until `unfollow` or it says False."""
        follower = Follower(moment(), tell)
        self._followers[follower] = None
        self._newcomers.fire()
        return follower

    def unfollow(self, follower: Follower) -> None:
        """Tell it nothing more (idempotent)."""
        self._followers.pop(follower, None)

    async def run(self) -> None:
        """Forever: read when the queue changed, spaced; tell every follower."""
        backend = self._backend
        while True:
            changes, newcomers = backend.queue_changed.count, self._newcomers.count
            untold = False
            if self._followers:
                untold = await self._read_and_tell()
                await trio.sleep(backend.queue_read_spacing(self.interval))
            # A change or a newcomer while we read or slept counts (it is not
            # waited for again): a newly followed prompt learns its place at
            # the next reading, not at the safety poll.
            if (
                untold
                or backend.queue_changed.count != changes
                or self._newcomers.count != newcomers
            ):
                continue
            timeout = max(backend.queue_read_spacing(self.interval), SAFETY_POLL)
            with trio.move_on_after(timeout if self._followers else math.inf):
                await self._wait_for_news()

    async def _wait_for_news(self) -> None:
        """Until the queue changes or a prompt begins to be followed."""
        async with trio.open_nursery() as nursery:

            async def until(signal: Signal) -> None:
                await signal.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, self._backend.queue_changed)
            nursery.start_soon(until, self._newcomers)

    async def _read_and_tell(self) -> bool:
        """One reading, told to everyone followed before it was asked for; True when
        some follower came too late for it."""
        if not self._backend.is_connected():
            return False  # its prompts wait for the socket; a `status` follows a reconnect
        try:
            reading = await self._backend.read_queue(started_after=moment())
        except BackendUnavailable:
            return False  # read again when the queue changes, or at the safety poll
        untold = False
        told = 0
        for follower in list(self._followers):
            if follower not in self._followers:
                continue  # unfollowed during an earlier turn
            if follower.since > reading.started:
                untold = True
                continue
            if told and told % PLACES_PER_TURN == 0:
                await trio.lowlevel.checkpoint()
                if follower not in self._followers:
                    continue
            told += 1
            if not follower.tell(reading):
                self.unfollow(follower)
        self.places_told += told
        return untold
