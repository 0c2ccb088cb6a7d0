"""The benchmark's load client: worker processes on raw non-blocking sockets.

Each worker holds many SSE streams (or keep-alive POST connections) in one
epoll loop with a minimal chunked-SSE parse, stamps every event's arrival
with the monotonic clock, and reports its own CPU use while the
measurement ran, so a figure taken while the client itself was saturated can
be marked as such.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TypeAlias

_EVENT = re.compile(rb"^event: ?(\S+)", re.M)
_VALUE = re.compile(rb'"currentValue":(\d+)')
_HEAD_END = b"\r\n\r\n"


@dataclass
class Stream:
    """One SSE subscriber: its socket, parse state and what it received."""

    task: int
    sock: socket.socket
    request: bytes
    sent: int = 0
    head: bytes | None = None
    raw: bytearray = field(default_factory=bytearray)
    sse: bytearray = field(default_factory=bytearray)
    chunked: bool = True
    events: list[tuple[int, float]] = field(default_factory=list)  # (value, arrival)
    count: int = 0  # events received
    keep_from: int = 0  # keep only events with a value this high (long runs: memory)
    first: float | None = None
    terminal: str | None = None
    terminal_at: float | None = None
    closed: bool = False

    def feed(self, data: bytes, now: float) -> None:
        self.raw += data
        if self.head is None:
            end = self.raw.find(_HEAD_END)
            if end < 0:
                return
            self.head = bytes(self.raw[:end])
            self.chunked = b"chunked" in self.head.lower()
            del self.raw[: end + 4]
        if self.chunked:
            self._dechunk()
        else:
            self.sse += self.raw
            self.raw.clear()
        self._events(now)

    def _dechunk(self) -> None:
        raw = self.raw
        pos = 0
        while True:
            line_end = raw.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(raw[pos:line_end].split(b";", 1)[0], 16)
            start = line_end + 2
            if len(raw) < start + size + 2:
                break
            self.sse += raw[start : start + size]
            pos = start + size + 2
        del raw[:pos]

    def _events(self, now: float) -> None:
        sse = self.sse
        pos = 0
        while True:
            end = sse.find(b"\n\n", pos)
            if end < 0:
                break
            block = bytes(sse[pos:end])
            pos = end + 2
            kind = _EVENT.search(block)
            if kind is None:
                continue  # a comment (heartbeat) or the retry hint
            value = _VALUE.search(block)
            if self.first is None:
                self.first = now
            name = kind.group(1)
            number = int(value.group(1)) if value else -1
            self.count += 1
            if name != b"progress":
                self.terminal = name.decode()
                self.terminal_at = now
            if number >= self.keep_from or name != b"progress":
                self.events.append((number, now))
        del sse[:pos]


@contextlib.contextmanager
def no_collector_pauses() -> Iterator[None]:
    """No cyclic garbage collection while a worker measures (entered before it
    reports ready, as the collection it starts with takes a while; a worker
    that has nothing to set up first takes it as a decorator). A worker
    holding thousands of streams keeps every event it stamps, so Python's full
    collections, run about as often in every worker (they all record alike),
    stopped all of them together for 100-200 ms: that showed as the daemon's
    delivery latency (the fanout shape's p99). Nothing a worker builds is cyclic
    garbage, so reference counting frees all it drops meanwhile."""
    enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


# The daemon's (host, port), or the path of its Unix socket (listen = unix:/path).
Address: TypeAlias = tuple[str, int] | str


def host_header(address: Address) -> str:
    """The Host a request to `address` names."""
    if isinstance(address, str):
        return "localhost"  # a Unix socket has no host name
    return f"{address[0]}:{address[1]}"


def _connect(address: Address) -> socket.socket:
    """A non-blocking socket connected (or connecting) to `address`."""
    if isinstance(address, str):
        sock = _open(address, timeout=30)
        sock.setblocking(False)
        return sock
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex(address)
    if err not in (0, errno.EINPROGRESS):
        raise OSError(err, "connect failed")
    return sock


def _open(address: Address, timeout: float) -> socket.socket:
    """A blocking connection to `address`."""
    if not isinstance(address, str):
        return socket.create_connection(address, timeout=timeout)
    # A local connect completes at once; non-blocking, a full backlog would
    # fail it with EAGAIN rather than let it wait as TCP's SYN does.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def subscriber_worker(
    conn: Connection,
    address: Address,
    subscriptions: list[tuple[str, int]],
    keep_from: int = 0,
    prefix: str = "",
) -> None:
    """Open one stream per (task id, task number) (at `prefix`/progress/{id}: behind
    nginx, /comfy); report ("ready", ...) once each
    holds its first event, then wait for ("go",), then record until every stream
    ended (or ("stop",)), and report ("done", cpu, wall, results). Events with a
    value below `keep_from` are only counted."""
    poller = select.epoll()
    streams: dict[int, Stream] = {}
    host = host_header(address)
    pending = list(subscriptions)
    # Connect in waves, so the listen backlog is not overrun.
    while pending or any(s.first is None and not s.closed for s in streams.values()):
        while pending and sum(1 for s in streams.values() if s.head is None) < 200:
            task_id, task = pending.pop()
            request = (
                f"GET {prefix}/progress/{task_id} HTTP/1.1\r\nHost: {host}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
            stream = Stream(task, _connect(address), request, keep_from=keep_from)
            streams[stream.sock.fileno()] = stream
            poller.register(stream.sock, select.EPOLLOUT | select.EPOLLIN)
        _pump(poller, streams, 0.05)
    with no_collector_pauses():
        cpu, wall = _hold_and_record(conn, poller, streams)
    results = [(s.task, s.events, s.terminal, s.terminal_at, s.count) for s in streams.values()]
    for stream in streams.values():
        stream.sock.close()
    conn.send(("done", cpu, wall, results))


def _hold_and_record(
    conn: Connection, poller: select.epoll, streams: dict[int, Stream]
) -> tuple[float, float]:
    """Report ready, hold the streams (reading heartbeats) until told to go or
    stop, then record until every stream ended (or stop): the CPU and wall time
    of the recording."""
    conn.send(("ready", sum(1 for s in streams.values() if not s.closed)))
    while not conn.poll(0):
        _pump(poller, streams, 0.05)
    message = conn.recv()
    if message[0] != "go":
        return 0.0, 0.0
    for stream in streams.values():
        stream.events.clear()
        stream.count = 0
    cpu0, wall0 = time.process_time(), time.monotonic()
    unfinished = sum(1 for s in streams.values() if s.terminal is None and not s.closed)
    while unfinished > 0:
        unfinished -= _pump(poller, streams, 0.02)
        if conn.poll(0):
            conn.recv()
            break
    return time.process_time() - cpu0, time.monotonic() - wall0


def _pump(poller: select.epoll, streams: dict[int, Stream], timeout: float) -> int:
    """Serve ready sockets; returns how many streams ended (terminal event or EOF)."""
    ended = 0
    for fd, mask in poller.poll(timeout):
        stream = streams[fd]
        if not stream.closed:
            ended += _serve(poller, stream, mask)
    return ended


def _serve(poller: select.epoll, stream: Stream, mask: int) -> int:
    """Serve one ready socket; 1 when the stream ended here."""
    if mask & select.EPOLLOUT and stream.sent < len(stream.request):
        try:
            stream.sent += stream.sock.send(stream.request[stream.sent :])
        except BlockingIOError:
            pass
        except OSError:
            _close(poller, stream)
            return 1
        if stream.sent >= len(stream.request):
            poller.modify(stream.sock, select.EPOLLIN)
    if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
        now = time.monotonic()
        try:
            data = stream.sock.recv(65536)  # above ~128 KiB each call would mmap a buffer
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            _close(poller, stream)
            return 1
        stream.feed(data, now)
        if stream.terminal is None:
            return 0
        _close(poller, stream)
        return 1
    return 0


def _close(poller: select.epoll, stream: Stream) -> None:
    stream.closed = True
    poller.unregister(stream.sock)


# ---------------------------------------------------------------- POST /generate


@dataclass
class Poster:
    sock: socket.socket
    out: bytes = b""
    sent: int = 0
    started: float = 0.0
    raw: bytearray = field(default_factory=bytearray)


@no_collector_pauses()
def generate_worker(
    conn: Connection, address: Address, connections: int, requests: int, first_task: int
) -> None:
    """`requests` POST /generate over `connections` keep-alive connections; reports
    ("done", cpu, wall, latencies, failures)."""
    poller = select.epoll()
    host = host_header(address)
    posters: dict[int, Poster] = {}
    latencies: list[float] = []
    failures = 0
    next_task = first_task
    remaining = requests
    conn.send(("ready", connections))
    conn.recv()
    cpu0, wall0 = time.process_time(), time.monotonic()

    def start(poster: Poster) -> None:
        nonlocal next_task, remaining
        remaining -= 1
        body = json.dumps({"prompt": f"bench-{next_task}"}).encode()
        next_task += 1
        poster.out = (
            f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        poster.sent = 0
        poster.started = time.monotonic()
        poller.modify(poster.sock, select.EPOLLOUT | select.EPOLLIN)

    for _ in range(min(connections, remaining)):
        poster = Poster(_connect(address))
        posters[poster.sock.fileno()] = poster
        poller.register(poster.sock, select.EPOLLOUT)
        start(poster)
    busy = len(posters)
    while busy:
        for fd, mask in poller.poll(1.0):
            poster = posters[fd]
            if mask & select.EPOLLOUT and poster.sent < len(poster.out):
                with contextlib.suppress(BlockingIOError):
                    poster.sent += poster.sock.send(poster.out[poster.sent :])
                if poster.sent >= len(poster.out):
                    poller.modify(poster.sock, select.EPOLLIN)
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                try:
                    data = poster.sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    failures += remaining + 1
                    remaining = 0
                    poller.unregister(poster.sock)
                    busy -= 1
                    continue
                poster.raw += data
                end = poster.raw.find(_HEAD_END)
                if end < 0:
                    continue
                head = bytes(poster.raw[:end]).lower()
                length = int(re.search(rb"content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                if len(poster.raw) < end + 4 + length:
                    continue
                del poster.raw[: end + 4 + length]
                if head.startswith(b"http/1.1 202"):
                    latencies.append(time.monotonic() - poster.started)
                else:
                    failures += 1
                if remaining > 0:
                    start(poster)
                else:
                    poller.unregister(poster.sock)
                    busy -= 1
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    conn.send(("done", cpu, wall, latencies, failures))


# ---------------------------------------------------------------- new requests


def probe_worker(conn: Connection, address: Address, interval: float) -> None:
    """Every `interval` s, a new connection with GET /healthz; reports its latencies
    (and the failures, as None) when told to stop."""
    samples: list[float | None] = []
    conn.send(("ready", 1))
    while not conn.poll(interval):
        start = time.monotonic()
        try:
            with _open(address, timeout=30) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            samples.append(time.monotonic() - start if b" 200 " in data[:20] else None)
        except OSError:
            samples.append(None)
    conn.recv()
    conn.send(("done", samples))


# ---------------------------------------------------------------- the floor


def floor_reader(conn: Connection, address: Address, streams: int, expected: int) -> None:
    """Connect `streams` sockets to `address` (a path: a Unix socket) and read `expected`
    bytes in all (with `expected` 0: read nothing, and hold them open until told to stop)."""
    socks = [_open(address, timeout=30) for _ in range(streams)]
    if not expected:
        conn.send(("ready", streams))
        conn.recv()
        conn.send(("done",))
        return
    poller = select.epoll()
    by_fd = {}
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock, select.EPOLLIN)
        by_fd[sock.fileno()] = sock
    conn.send(("ready", streams))
    got = 0
    while got < expected:
        for fd, _ in poller.poll(1.0):
            with contextlib.suppress(BlockingIOError):
                got += len(by_fd[fd].recv(65536))
    conn.send(("done",))
