"""A TCP relay in front of a real redis-server that can hold one daemon's command back:
a slow Redis for just that command, so a test decides what happens first (the
daemon's other tasks run meanwhile, as they would while the reply is slow)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio


@asynccontextmanager
async def redis_proxy(
    port: int,
    held: Callable[[bytes], bool],
    release: Callable[[], Awaitable[None]],
    sent: Callable[[bytes], None] = lambda data: None,
) -> AsyncIterator[str]:
    """The URL of a relay to 127.0.0.1:`port`; data a client sends for which `held`
    says True waits for `release()` before it goes on to Redis, and what the client
    sends after it waits behind it, in order. `sent(data)` sees what a client sends
    as soon as it is sent (also while earlier data is held)."""

    async def relay(client: trio.SocketStream) -> None:
        try:
            await pipe(client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away (a daemon stopping): so does the relay

    async def pipe(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", port)
        send, receive = trio.open_memory_channel[bytes](math.inf)
        async with client, server, trio.open_nursery() as nursery:

            async def read() -> None:
                async with send:
                    async for data in client:
                        sent(bytes(data))
                        await send.send(bytes(data))

            async def upstream() -> None:
                async for data in receive:
                    if held(data):
                        await release()
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                async for data in server:
                    await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            nursery.start_soon(upstream)
            nursery.start_soon(downstream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        yield f"redis://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


class SilentProxy:
    """A relay to 127.0.0.1:`port` that can go silent on the connections it relays now,
    as a network split without a reset would: nothing more goes either way and
    nothing is closed. Connections opened later are relayed as usual."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self._opened = 0  # connections accepted so far
        self._silent_below = 0  # connections numbered below this one are silent

    def silence(self) -> None:
        self._silent_below = self._opened

    async def relay(self, client: trio.SocketStream) -> None:
        number = self._opened
        self._opened += 1
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.port)
            async with client, server, trio.open_nursery() as nursery:

                async def forward(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                    async for data in source:
                        if number < self._silent_below:
                            await trio.sleep_forever()  # split: it never arrives
                        await sink.send_all(data)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(forward, client, server)
                nursery.start_soon(forward, server, client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away (a daemon stopping): so does the relay


@asynccontextmanager
async def silent_proxy(port: int) -> AsyncIterator[SilentProxy]:
    proxy = SilentProxy(port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.relay, 0, host="127.0.0.1"))
        proxy.url = f"redis://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield proxy
        nursery.cancel_scope.cancel()
