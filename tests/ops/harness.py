"""The daemon as systemd runs it, and nginx in front of it, for the ops tests.

- `NotifySocket`: the test's end of $NOTIFY_SOCKET, an AF_UNIX datagram socket
  in the abstract namespace ("@name"), receiving each message with its
  sender's pid (SCM_CREDENTIALS), as systemd checks it for NotifyAccess=main.
- `running_daemon`: `python -m daemon.cli serve ...` in a subprocess with
  NOTIFY_SOCKET set, optionally socket-activated on a socket the test owns
  (through `tests.ops.service_exec`); ready when READY=1 arrives. Stopped
  with SIGTERM (then SIGKILL) however the test ends.
- `run_nginx` (`nginx_process` for sync tests): the Debian nginx binary with
  a throw-away prefix, running the shipped site file
  (systemd/nginx-comfy-progress.conf) with only its ports, listen address and
  proxy_read_timeout substituted.

Readiness is always an event: a datagram, a line on a pipe. Nothing sleeps.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from daemon.http.client import http_request, open_stream
from protocol.sse import ServerSentEvent, SSEDecoder

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO_ROOT / "systemd"
SITE_FILE = SYSTEMD_DIR / "nginx-comfy-progress.conf"

STOP_TIMEOUT = 15.0
# Variables a test run may itself have inherited (CI under systemd, a user's
# COMFY_PROGRESS_* settings); the daemon under test gets only what we give it.
_FOREIGN_VARIABLES = re.compile(
    r"^(NOTIFY_SOCKET|WATCHDOG_USEC|WATCHDOG_PID|LISTEN_PID|LISTEN_FDS|LISTEN_FDNAMES"
    r"|JOURNAL_STREAM|COMFY_PROGRESS_.*)$"
)
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class DaemonExited(AssertionError):
    """The daemon ended while the test still waited for something from it."""


def daemon_environ(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_VARIABLES.match(k)}
    env.update(extra)
    return env


# ---------------------------------------------------------------- sd_notify


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram: its KEY=VALUE lines and the sender's pid."""

    fields: dict[str, str]
    raw: str
    pid: int


class NotifySocket:
    """An abstract-namespace AF_UNIX datagram socket, like systemd's notify socket."""

    def __init__(self) -> None:
        self.name = f"comfy-progress-test-{os.getpid()}-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name)
        self.sock.setblocking(False)

    @property
    def address(self) -> str:
        """The value for $NOTIFY_SOCKET ("@" marks the abstract namespace)."""
        return "@" + self.name

    def receive_nowait(self) -> Notification | None:
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(_UCRED.size)
            )
        except BlockingIOError:
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        raw = data.decode()
        fields = dict(line.partition("=")[::2] for line in raw.split("\n") if line)
        return Notification(fields, raw, pid)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- the daemon


@dataclass
class DaemonProcess:
    process: trio.Process
    notify: NotifySocket
    log_path: Path
    notifications: list[Notification] = field(default_factory=list)
    url: str = ""  # from the READY=1 message's STATUS ("serving http://..." or "unix:/...")
    comfy_url: str = ""  # likewise ("ComfyUI http://... connected")
    terminated: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-60:])

    async def notification(self) -> Notification:
        """The next sd_notify message; DaemonExited once the daemon is gone and none is left."""
        while True:
            note = self.notify.receive_nowait()
            if note is not None:
                self.notifications.append(note)
                return note
            if self.process.returncode is not None:
                raise DaemonExited(
                    f"daemon exited with {self.process.returncode}; log:\n{self.log()}"
                )
            async with trio.open_nursery() as nursery:

                async def first(wait: Callable[[], Awaitable[object]]) -> None:
                    await wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(first, self.notify.wait_readable)
                nursery.start_soon(first, self.process.wait)

    def drain(self) -> list[Notification]:
        """Every message still queued in the socket (e.g. after the daemon exited)."""
        while (note := self.notify.receive_nowait()) is not None:
            self.notifications.append(note)
        return self.notifications

    async def wait_for(self, predicate: Callable[[Notification], bool]) -> Notification:
        while True:
            note = await self.notification()
            if predicate(note):
                return note

    async def wait_ready(self) -> Notification:
        ready = await self.wait_for(lambda n: n.fields.get("READY") == "1")
        match = re.search(
            r"serving ((?:http|unix):\S+?); ComfyUI (http://\S+) ", ready.fields["STATUS"]
        )
        assert match, f"READY=1 without the URLs in STATUS: {ready.raw!r}"
        self.url, self.comfy_url = match.groups()
        return ready

    async def sim_control(self, **knobs: object) -> None:
        """Turn the embedded simulator's knobs (POST /sim/control)."""
        body = json.dumps(knobs).encode()
        headers = [("Content-Type", "application/json")]
        response = await http_request(
            "POST", f"{self.comfy_url}/sim/control", headers=headers, body=body, timeout=10
        )
        assert response.status == 200, response.body

    def terminate(self) -> None:
        """SIGTERM, once: a second one would find the daemon's handler gone and kill it."""
        if self.process.returncode is None and not self.terminated:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    async def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT); the exit status."""
        with trio.CancelScope(shield=True):
            self.terminate()
            with trio.move_on_after(STOP_TIMEOUT):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    *args: str,
    listen_socket: socket.socket | None = None,
    env: Mapping[str, str] | None = None,
    pid_env: Sequence[str] = (),
    wait_ready: bool = True,
    listen: str = "127.0.0.1:0",
) -> AsyncIterator[DaemonProcess]:
    """`comfy-progress serve` in a subprocess with $NOTIFY_SOCKET set, as systemd starts it.

    `args` are extra `serve` arguments (e.g. "--simulate", "--set", "k=v").
    With `listen_socket` the daemon is socket-activated on it (fd 3, LISTEN_*);
    without, it binds `listen` itself. `pid_env` names variables set to the
    daemon's own pid (e.g. WATCHDOG_PID), as systemd sets them.
    """
    serve = [
        sys.executable,
        "-m",
        "daemon.cli",
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--log-level",
        "info",
        *args,
    ]
    wrapper = [sys.executable, "-m", "tests.ops.service_exec"]
    for name in pid_env:
        wrapper += ["--pid-env", name]
    pass_fds: Sequence[int] = ()
    if listen_socket is None:
        serve += ["--listen", listen]
    else:
        pass_fds = (listen_socket.fileno(),)
        wrapper.append(f"{listen_socket.fileno()}=http")
    command = [*wrapper, "--", *serve] if len(wrapper) > 3 else serve
    notify = NotifySocket()
    log_path = tmp_path / f"daemon-{secrets.token_hex(3)}.log"
    try:
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command,
                cwd=REPO_ROOT,
                env=daemon_environ({"NOTIFY_SOCKET": notify.address, **(env or {})}),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
            )
        daemon = DaemonProcess(process, notify, log_path)
        try:
            if wait_ready:
                await daemon.wait_ready()
            yield daemon
        finally:
            await daemon.stop()
    finally:
        notify.close()


def listening_socket(path: Path | None = None) -> socket.socket:
    """What comfy-progress.socket gives the service: a TCP socket bound and listening
    (with `path`: a Unix stream socket there, as ListenStream=/path makes)."""
    if path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextmanager
def short_directory() -> Iterator[Path]:
    """A directory for socket files: a socket path has at most 107 bytes, tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="cp-ops-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- nginx


def nginx_binary() -> str:
    """Debian's nginx (nginx-light): /usr/sbin is not on every PATH."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        raise AssertionError("nginx is not installed (Debian: nginx-light; .ci/run installs it)")
    return found


def _substitute(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count >= 1, f"the site file no longer has {pattern!r}: update the test with it"
    return new


Upstream = int | Path  # the daemon's port on 127.0.0.1, or its Unix socket


def render_site(*, upstream: Upstream, listen_port: int, read_timeout: str) -> str:
    """The shipped site file, with only what a test must change changed.

    Upstream (the daemon under test: its port, or its Unix socket through the
    file's commented `server unix:` alternative), listen lines (an unprivileged
    port on 127.0.0.1) and proxy_read_timeout (short, to be outlasted); every
    other line is tested as shipped.
    """
    site = SITE_FILE.read_text()
    if isinstance(upstream, Path):
        site = _substitute(site, r"^\s*server\s+127\.0\.0\.1:8000;\n", "")
        site = _substitute(
            site,
            r"^(\s*)#\s*(server\s+unix:)/run/comfy-progress/http\.sock;",
            rf"\g<1>\g<2>{upstream};",
        )
    else:
        site = _substitute(
            site, r"^(\s*server\s+)127\.0\.0\.1:8000;", rf"\g<1>127.0.0.1:{upstream};"
        )
    site = _substitute(
        site,
        r"^(\s*)listen\s+80(\s+default_server)?;",
        rf"\g<1>listen 127.0.0.1:{listen_port}\g<2>;",
    )
    site = _substitute(site, r"^\s*listen\s+\[::\]:80\b[^;]*;\n", "")
    site = _substitute(site, r"^(\s*proxy_read_timeout\s+)\S+;", rf"\g<1>{read_timeout};")
    return site


def main_config(prefix: Path, site: Path, connections: int = 256) -> str:
    """nginx.conf around the site: everything under `prefix`, in the foreground.

    Two http-level settings make the test stricter than Debian's defaults:
    gzip on for event streams and JSON (as an eager admin might set it), and
    X-Accel-Buffering from the daemon ignored, so only the site file's own
    proxy_buffering / gzip settings can keep the stream unbuffered.
    `connections` per worker count both sides of each proxied request.
    """
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers need our tmp dir
    return f"""\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {connections + 64};
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
error_log stderr notice;

events {{
    worker_connections {connections};
}}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;

    gzip on;
    gzip_min_length 1;
    gzip_proxied any;
    gzip_types text/event-stream application/json text/plain;
    proxy_ignore_headers X-Accel-Buffering;

    include {site};
}}
"""


def free_port() -> int:
    """A port for nginx's listen line (nginx binds it itself, so this can race; rarely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NginxProcess:
    prefix: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")[-6000:]
        except OSError:
            return "(no error log)"


def prepare_nginx(
    tmp_path: Path, upstream: Upstream, read_timeout: str, connections: int = 256
) -> NginxProcess:
    """Write the prefix (nginx.conf around the rendered site) and check it with `nginx -t`."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    site = prefix / "comfy-progress.conf"
    site.write_text(render_site(upstream=upstream, listen_port=port, read_timeout=read_timeout))
    (prefix / "nginx.conf").write_text(main_config(prefix, site, connections))
    checked = subprocess.run(
        [*nginx_command(prefix), "-t", "-q"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    return NginxProcess(prefix, port)


def nginx_command(prefix: Path) -> list[str]:
    return [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf")]


READY_LINE = b"start worker process"  # the master logs it once its sockets listen


async def run_nginx(
    tmp_path: Path,
    upstream: Upstream,
    read_timeout: str = "90s",
    *,
    task_status: trio.TaskStatus[NginxProcess] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run nginx until cancelled: `nginx = await nursery.start(run_nginx, tmp_path, port)`.

    Started means listening (READY_LINE on its stderr, which this task keeps
    draining). Stopped with SIGTERM, then SIGKILL for its whole process
    group, however the test ends.
    """
    nginx = await trio.to_thread.run_sync(prepare_nginx, tmp_path, upstream, read_timeout)
    process = await trio.lowlevel.open_process(
        nginx_command(nginx.prefix),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the workers go with it
    )
    try:
        assert process.stderr is not None
        seen = b""
        async for chunk in process.stderr:
            seen = (seen + chunk)[-4096:]
            if READY_LINE in seen:
                task_status.started(nginx)
                break
        else:
            raise AssertionError(f"nginx ended at start:\n{nginx.error_log()}")
        async for _chunk in process.stderr:
            pass  # keep the pipe drained (errors also go to error.log)
        raise AssertionError(f"nginx ended early:\n{nginx.error_log()}")
    finally:
        with trio.CancelScope(shield=True):
            await _stop_nginx(process)


@contextmanager
def nginx_process(
    tmp_path: Path, upstream: Upstream, read_timeout: str = "90s", connections: int = 256
) -> Iterator[NginxProcess]:
    """run_nginx for synchronous tests (the Playwright ones, and the benchmark's
    fanout behind nginx): a thread drains stderr."""
    nginx = prepare_nginx(tmp_path, upstream, read_timeout, connections)
    process = subprocess.Popen(
        nginx_command(nginx.prefix),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        seen = b""
        for line in process.stderr:
            seen = (seen + line)[-4096:]
            if READY_LINE in seen:
                ready.set()
        ready.set()  # ended

    reader = threading.Thread(target=drain, name="nginx-stderr", daemon=True)
    reader.start()
    try:
        ready.wait(30)
        if process.poll() is not None or not ready.is_set():
            raise AssertionError(f"nginx did not start:\n{nginx.error_log()}")
        yield nginx
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(STOP_TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()


async def _stop_nginx(process: trio.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)  # fast shutdown: master stops its workers
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
    if process.returncode is None:
        os.killpg(process.pid, signal.SIGKILL)  # the group we started: master and workers
        await process.wait()


# ---------------------------------------------------------------- HTTP + SSE


async def generate(
    base_url: str, prompt: str = "a red fox", *, unix_socket: str | None = None
) -> dict[str, Any]:
    """POST {base_url}/generate (to `unix_socket` if given); the 202 reply."""
    response = await http_request(
        "POST",
        f"{base_url}/generate",
        headers=[("Content-Type", "application/json")],
        body=json.dumps({"prompt": prompt}).encode(),
        timeout=10,
        unix_socket=unix_socket,
    )
    assert response.status == 202, response.body
    reply: dict[str, Any] = response.json()
    return reply


async def follow(url: str, *, unix_socket: str | None = None) -> tuple[list[ServerSentEvent], bool]:
    """Read an SSE stream to its end: (its events, whether the body ended properly)."""
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    headers = [("Accept", "text/event-stream")]
    async with open_stream("GET", url, headers=headers, unix_socket=unix_socket) as response:
        assert response.status == 200, response.status
        assert response.headers.get("content-type", "").startswith("text/event-stream")
        async for chunk in response.chunks:
            events.extend(decoder.feed(chunk))
        return events, response.chunks.complete


def payload(event: ServerSentEvent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event.data)
    return data
