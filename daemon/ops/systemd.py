"""systemd integration: sd_notify(3) and socket activation (sd_listen_fds(3)), no libsystemd.

Notifications (`Type=notify`)
    `$NOTIFY_SOCKET` names an AF_UNIX datagram socket: a path, or `@name` for
    the abstract namespace. Each message is newline-separated `KEY=VALUE`
    lines in one datagram. We send:

    - `READY=1` (with the first `STATUS=`) once every service of the app has
      started: `Systemd.run` is the last service `App.run` starts;
    - `STATUS=...` whenever the one-line summary changes (ComfyUI connected or
      not, tasks running and queued), at most every `STATUS_MIN_INTERVAL` s;
    - `WATCHDOG=1` every half of `$WATCHDOG_USEC`, from a Trio task, so the
      pings stop when the event loop stops running (a blocked loop gets the
      service restarted); only when `$WATCHDOG_PID` is unset or our pid;
    - `STOPPING=1` when the app starts shutting down.

    Without `$NOTIFY_SOCKET` every call is a no-op. A failed send is logged,
    never raised: systemd being away must not take the daemon down.

Socket activation
    With `$LISTEN_PID` equal to our pid, `$LISTEN_FDS` sockets start at fd 3
    (`SD_LISTEN_FDS_START`). They must be listening TCP or Unix stream sockets
    (`comfy-progress.socket`); they become the HTTP server's listeners and the
    `listen` setting is ignored. A Unix socket file stays systemd's: the
    daemon never removes it. `LISTEN_PID`, `LISTEN_FDS` and
    `LISTEN_FDNAMES` are removed from the environment whether or not they were
    meant for us, so no child process inherits them, and the fds get
    FD_CLOEXEC. Without them the daemon binds `listen` itself.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from protocol.task import Phase

if TYPE_CHECKING:
    from daemon.comfy.backend import ComfyBackend
    from daemon.signals import Signal

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START: Final = 3
LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
STATUS_MIN_INTERVAL: Final = 0.25  # seconds between two STATUS= updates at most
NOTIFY_TIMEOUT: Final = 5.0  # seconds one message may wait for room in systemd's queue


class SocketActivationError(Exception):
    """The sockets systemd passed (LISTEN_FDS) cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    sock: socket.socket
    name: str  # from LISTEN_FDNAMES ("unknown" when systemd gave none)


def take_listen_fds(environ: MutableMapping[str, str], pid: int) -> list[InheritedSocket]:
    """sd_listen_fds(unset_environment=1): the listening sockets systemd passed us.

    Empty when there are none or they are meant for another process. Raises
    SocketActivationError when the variables or the fds are unusable.
    """
    listen_pid = environ.get("LISTEN_PID", "")
    listen_fds = environ.get("LISTEN_FDS", "")
    fd_names = environ.get("LISTEN_FDNAMES", "")
    for name in LISTEN_VARIABLES:
        environ.pop(name, None)
    if not listen_pid or not listen_fds:
        return []
    if not listen_pid.isdigit() or not listen_fds.isdigit():
        raise SocketActivationError(
            f"LISTEN_PID={listen_pid!r} and LISTEN_FDS={listen_fds!r} must be numbers"
        )
    if int(listen_pid) != pid:
        log.info("LISTEN_FDS is for process %s, not us (%d): binding ourselves", listen_pid, pid)
        return []
    count = int(listen_fds)
    names = fd_names.split(":") if fd_names else []
    inherited = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) else "unknown"
        inherited.append(InheritedSocket(_listening_socket(fd, name), name))
    return inherited


def _listening_socket(fd: int, name: str) -> socket.socket:
    where = f"fd {fd} ({name}) from LISTEN_FDS"
    try:
        os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds() does
        sock = socket.socket(fileno=fd)  # family and type are read from the fd
    except OSError as exc:
        raise SocketActivationError(f"{where} is not a socket: {exc.strerror}") from None
    families = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
    if sock.family not in families or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SocketActivationError(
            f"{where} must be a TCP or Unix stream socket (ListenStream=HOST:PORT or "
            f"ListenStream=/path), not {sock.family.name}/{sock.type.name}"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise SocketActivationError(f"{where} is not listening (Accept=no sockets only)")
    return sock


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """sd_watchdog_enabled(): seconds between WATCHDOG=1 pings (half the timeout), or None."""
    usec = environ.get("WATCHDOG_USEC", "")
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if watchdog_pid and (not watchdog_pid.isdigit() or int(watchdog_pid) != pid):
        return None  # another process of the service owns the watchdog
    return int(usec) / 1_000_000 / 2


def notify_address(value: str) -> str | None:
    """$NOTIFY_SOCKET -> an AF_UNIX address ('@name' is the abstract namespace)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:...: not for us


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """What the STATUS= line summarises, read when it may have changed."""

    backends: Sequence[ComfyBackend]
    task_phases: Callable[[], Iterable[Phase]]  # every tracked task's phase now
    tasks_changed: Signal  # a task was added, changed phase or was forgotten

    def signals(self) -> tuple[Signal, ...]:
        """Fire when the line may read differently."""
        return (*(backend.connected_changed for backend in self.backends), self.tasks_changed)


def status_line(status: ServiceStatus, url: str) -> str:
    """'serving http://...; ComfyUI http://... connected; 2 tasks running, 1 queued'."""
    running = queued = 0
    for phase in status.task_phases():
        if phase is Phase.RUNNING:
            running += 1
        elif phase in (Phase.QUEUED, Phase.REQUEUED, Phase.WAITING):
            queued += 1
    backends = status.backends
    if len(backends) == 1:
        backend = backends[0]
        comfy = f"{backend.name} {'connected' if backend.is_connected() else 'not connected'}"
    else:
        up = sum(1 for backend in backends if backend.is_connected())
        comfy = f"{up} of {len(backends)} backends up"
    return (
        f"serving {url}; ComfyUI {comfy}; "
        f"{running} task{'s' if running != 1 else ''} running, {queued} queued"
    )


class Systemd:
    """What systemd handed this process (sockets, notify socket, watchdog) and the notifier."""

    def __init__(
        self,
        *,
        notify_socket: str | None = None,
        watchdog_interval: float | None = None,
        inherited: Sequence[InheritedSocket] = (),
    ) -> None:
        self.notify_address = notify_address(notify_socket) if notify_socket else None
        if notify_socket and self.notify_address is None:
            log.warning("NOTIFY_SOCKET=%s is not an AF_UNIX socket: not notifying", notify_socket)
        self.watchdog_interval = watchdog_interval if self.notify_address else None
        self.inherited = list(inherited)
        self.stopping = False
        self.sent = 0  # datagrams sent
        self._send_lock = trio.Lock()
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
    ) -> Systemd:
        """Read what systemd set (LISTEN_* are removed); may raise SocketActivationError."""
        env = os.environ if environ is None else environ
        own_pid = os.getpid() if pid is None else pid
        inherited = take_listen_fds(env, own_pid)
        return cls(
            notify_socket=env.get("NOTIFY_SOCKET") or None,
            watchdog_interval=watchdog_interval(env, own_pid),
            inherited=inherited,
        )

    @property
    def enabled(self) -> bool:
        return self.notify_address is not None

    def listeners(self) -> list[trio.SocketListener]:
        """The inherited sockets as Trio listeners (empty: bind `listen` yourself)."""
        listeners = []
        for item in self.inherited:
            log.info("socket activation: serving on %s (%s)", item.sock.getsockname(), item.name)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(item.sock)))
        self.inherited = []  # the listeners own them now
        return listeners

    async def notify(self, *lines: str) -> None:
        """Send one datagram of KEY=VALUE lines (a no-op without NOTIFY_SOCKET)."""
        await self._send(lines)

    async def _send(self, lines: Sequence[str], *, unless_stopping: bool = False) -> None:
        if self.notify_address is None:
            return
        message = "\n".join(lines).encode("utf-8", "replace")
        async with self._send_lock:  # keeps the order of messages
            if unless_stopping and self.stopping:
                return
            try:
                # A socket per message, as sd_notify() does: nothing to close
                # later, and a restarted systemd's new socket is found. A full
                # queue on systemd's side must not hold up a shutdown.
                with trio.fail_after(NOTIFY_TIMEOUT):
                    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                        await sock.sendto(message, self.notify_address)
            except (OSError, trio.TooSlowError) as exc:
                # A datagram is not worth dying for; say it once, then quietly.
                level = logging.DEBUG if self._warned else logging.WARNING
                log.log(level, "sd_notify to %r failed: %r", self.notify_address, exc)
                self._warned = True
                return
        self.sent += 1

    async def run(
        self,
        status: ServiceStatus,
        url: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start it last: READY=1, then keep STATUS current and the watchdog fed."""
        line = status_line(status, url)
        await self.notify("READY=1", f"STATUS={line}")
        task_status.started()
        if self.notify_address is None:
            return
        async with trio.open_nursery() as nursery:
            if self.watchdog_interval is not None:
                nursery.start_soon(self._feed_watchdog, self.watchdog_interval)
            nursery.start_soon(self._report_status, status, url, line)

    async def notify_stopping(self, detail: str) -> None:
        """STOPPING=1: from here on STATUS only describes the shutdown."""
        self.stopping = True
        await self.notify("STOPPING=1", f"STATUS=stopping: {detail}")

    async def _feed_watchdog(self, interval: float) -> None:
        # Runs on the event loop like everything else: if the loop is stuck,
        # the pings stop and systemd restarts us after WatchdogSec.
        while True:
            await self.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _report_status(self, status: ServiceStatus, url: str, last: str) -> None:
        signals = status.signals()
        while not self.stopping:
            seen = [signal.count for signal in signals]
            current = status_line(status, url)
            if current != last:
                await self._send([f"STATUS={current}"], unless_stopping=True)
                last = current
            await trio.sleep(STATUS_MIN_INTERVAL)  # progress ticks fire often; coalesce
            if [signal.count for signal in signals] == seen:
                async with trio.open_nursery() as nursery:
                    for signal in signals:
                        nursery.start_soon(_wait_then_cancel, signal.wait, nursery.cancel_scope)

    def close(self) -> None:
        """Close inherited sockets nobody took (listeners() was never called)."""
        for item in self.inherited:
            item.sock.close()
        self.inherited = []


async def _wait_then_cancel(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
