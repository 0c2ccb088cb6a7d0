"""A TCP relay in front of a real (simulated) ComfyUI that a test can break in ways
the simulator itself cannot: the network down while ComfyUI keeps its state, or
one kind of request failing while the WebSocket stays up, or its answer late."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

_TROUBLE = b"500 Internal Server Error\n\nServer got itself in trouble"
SERVER_ERROR = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TROUBLE), _TROUBLE)
)


class ComfyRelay:
    """Relays every connection to 127.0.0.1:`port`, unless told to fail it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""  # set once listening
        self.down = False  # cut every connection and refuse new ones
        self.failing: bytes | None = None  # close a connection whose request starts so
        self.failed = 0  # requests closed unanswered because of `failing`
        self.failed_one = trio.Event()
        # The network dies once ComfyUI answered a request that starts so (it
        # arrived and was acted on; its answer never comes back).
        self.dies_after: bytes | None = None
        self.died = trio.Event()
        self.stays_up = False  # with dies_after: only that connection dies
        # Requests that start so are answered 500 by the relay (ComfyUI's handler
        # raised), as aiohttp answers them.
        self.answers_500: bytes | None = None
        self.answered_500 = 0
        self.answered_500_again = trio.Event()  # set (and replaced) at each such answer
        # Answers to requests that start so are held back until `release()` (ComfyUI
        # acted on the request; its answer is late).
        self.holds: bytes | None = None
        self.holding = trio.Event()  # set once such an answer is held
        self._released = trio.Event()
        self._live: set[trio.CancelScope] = set()

    def go_down(self) -> None:
        """The network to ComfyUI is gone: every connection is cut, new ones refused."""
        self.down = True
        for scope in list(self._live):
            scope.cancel()

    def come_back(self) -> None:
        self.down = False

    def hold_answers(self, request_start: bytes) -> None:
        self.holds, self.holding, self._released = request_start, trio.Event(), trio.Event()

    def release(self) -> None:
        """The answers held back go out (and no more are held)."""
        self.holds = None
        self._released.set()

    async def until_answered_500(self, times: int) -> None:
        while self.answered_500 < times:
            await self.answered_500_again.wait()

    async def relay(self, client: trio.SocketStream) -> None:
        if self.down:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._live.add(scope)
            try:
                await self._pipe(client)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # one side went away: so does the relay
            finally:
                self._live.discard(scope)

    async def _pipe(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.port)
        answer_lost = False
        held_until: trio.Event | None = None
        async with client, server, trio.open_nursery() as nursery:

            async def upstream() -> None:
                nonlocal answer_lost, held_until
                async for data in client:
                    if self.failing is not None and bytes(data).startswith(self.failing):
                        self.failed += 1
                        self.failed_one.set()
                        break  # closed without an answer
                    if self.answers_500 is not None and bytes(data).startswith(self.answers_500):
                        self.answered_500 += 1
                        self.answered_500_again.set()
                        self.answered_500_again = trio.Event()
                        await client.send_all(SERVER_ERROR)
                        break
                    if self.dies_after is not None and bytes(data).startswith(self.dies_after):
                        answer_lost = True
                    if self.holds is not None and bytes(data).startswith(self.holds):
                        held_until = self._released
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                nonlocal held_until
                async for data in server:
                    if held_until is not None:
                        self.holding.set()
                        await held_until.wait()
                        held_until = None
                    if answer_lost:
                        self.died.set()
                        if not self.stays_up:
                            self.go_down()  # (cancels this relay too: no answer)
                        nursery.cancel_scope.cancel()
                        return
                    await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)


@asynccontextmanager
async def comfy_relay(port: int) -> AsyncIterator[ComfyRelay]:
    """A relay to the ComfyUI listening on 127.0.0.1:`port`; its `url` is the daemon's."""
    relay = ComfyRelay(port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay.relay, 0, host="127.0.0.1"))
        relay.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield relay
        nursery.cancel_scope.cancel()
