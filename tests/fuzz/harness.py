"""The fuzzer's side of the wire: the daemon as a real process, one request per connection.

Blocking sockets, so `make fuzz` can run many exchanges at once in threads
and Hypothesis can call them from a plain test function.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.grammar import VALID_PNG, Context, FuzzRequest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Short timeouts, so requests that stall (no half-close, a body shorter than
# its Content-Length) cost the fuzzer little time.
TIMEOUTS = {
    "header_read_timeout": 0.5,
    "body_read_timeout": 0.5,
    "keep_alive_timeout": 0.3,
    "write_timeout": 2.0,
}
CLOSE_LINGER = 2.0  # HttpLimits.close_linger_timeout
# A connection must be answered or closed within the configured timeouts;
# the slack is for a loaded machine (2 cores shared by the fuzzer's threads).
ANSWER_BOUND = sum(TIMEOUTS.values()) + CLOSE_LINGER + 5.0

# Every status the daemon documents: success, 304 for cached files, the 4xx of
# README.md (401 token, 403 origin, 421 host among them), 429/503 for load,
# 501 for a transfer coding it does not implement (RFC 9112 section 6.1), and
# 505 for an HTTP major version other than 1 (RFC 9110 section 15.6.6). Never 500.
ALLOWED_STATUSES = frozenset(
    {100, 200, 201, 202, 204, 304, 400, 401, 403, 404, 405, 408, 410, 413, 415, 421, 422, 429}
    | {431, 501, 503, 505}
)
_STATUS_LINE = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3}) ")
_LISTENING = re.compile(r"listening on (http://\S+) ")


@dataclass
class Exchange:
    statuses: list[int]
    received: bytes = b""
    held: bool = False  # neither answered nor closed within ANSWER_BOUND
    reset: bool = False  # the server closed while we were still sending, or reset


def exchange(address: tuple[str, int], request: FuzzRequest) -> Exchange:
    """Send `request` on a new connection and read until the server closes it."""
    deadline = time.monotonic() + ANSWER_BOUND
    received = bytearray()
    result = Exchange([])
    with socket.create_connection(address, timeout=ANSWER_BOUND) as sock:
        try:
            sock.sendall(request.raw)
            if request.half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            result.reset = True  # answered early (413, 431) and closed: allowed
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.held = True
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                result.held = True
                break
            except ConnectionResetError:
                result.reset = True
                break
            if not data:
                break
            received += data
    result.received = bytes(received)
    result.statuses = [int(code) for code in _STATUS_LINE.findall(received)]
    return result


def problems(request: FuzzRequest, result: Exchange) -> list[str]:
    """What is wrong with the answer to `request` (empty when nothing is)."""
    found = []
    if result.held:
        found.append(f"no answer and no close within {ANSWER_BOUND:.1f} s")
    bad = [status for status in result.statuses if status not in ALLOWED_STATUSES]
    if bad:
        found.append(f"undocumented status {bad}")
    # Silence is allowed only for input that is no request at all (blank), or
    # when the server cut our sending short.
    if not result.statuses and not result.reset and not result.held and request.raw.strip():
        found.append("closed without an answer")
    head, _, after = result.received.partition(b"\r\n\r\n")
    request_head = request.raw.partition(b"\r\n\r\n")[0].lower()
    if request.raw.startswith(b"HEAD ") and after and not after.startswith(b"HTTP/1."):
        found.append("a body in the answer to HEAD")
    # RFC 9112 section 6.1: after a request framed both ways, close.
    both = b"\ncontent-length:" in request_head and b"\ntransfer-encoding:" in request_head
    if both and head and b"\r\nconnection: close" not in head.lower():
        found.append("Content-Length with Transfer-Encoding, but the connection stays open")
    return found


LOG_PROBLEM = re.compile(r"level=(error|critical)|Traceback")


@dataclass
class DaemonLog:
    path: Path
    offset: int = 0
    seen: list[str] = field(default_factory=list)

    def new_problems(self) -> list[str]:
        """Error lines and tracebacks logged since the last call."""
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        # Only whole lines: a record being written is read next time.
        end = data.rfind(b"\n") + 1
        self.offset += end
        lines = data[:end].decode(errors="replace").splitlines()
        return [line for line in lines if LOG_PROBLEM.search(line)]


@dataclass
class FuzzDaemon:
    process: subprocess.Popen[bytes]
    address: tuple[str, int]
    log: DaemonLog
    context: Context


@contextmanager
def fuzz_daemon(data_dir: Path) -> Iterator[FuzzDaemon]:
    """`comfy-progress serve --simulate` with short timeouts; two tasks run to completion."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-daemon.log"
    # A low max_tasks: the fuzzer's tasks soon fill it, and POSTs see 503 too.
    settings = {**TIMEOUTS, "simulator_step_time": 0.001, "max_tasks": 50}
    command = [
        sys.executable,
        "-m",
        "daemon.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--simulate",
        "--data-dir",
        str(data_dir),
        *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")),
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    try:
        url = _wait_listening(process, log_path)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        address = (host, int(port))
        context = Context(task_ids=_finished_tasks(address, 2), image_names=(_upload(address),))
        yield FuzzDaemon(process, address, DaemonLog(log_path), context)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_listening(process: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = _LISTENING.search(text)
        if match:
            return match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the daemon did not start:\n{log_path.read_text(errors='replace')}")


def _finished_tasks(address: tuple[str, int], count: int) -> tuple[str, ...]:
    ids = []
    for _ in range(count):
        answer = _call(address, "POST", "/generate", {"prompt": "a fox for the fuzzer"})
        ids.append(str(answer["taskId"]))
    for task_id in ids:
        deadline = time.monotonic() + 30
        while _call(address, "GET", f"/tasks/{task_id}")["status"] != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {task_id} did not complete")
            time.sleep(0.02)
    return tuple(ids)


def _upload(address: tuple[str, int]) -> str:
    answer = _call(address, "POST", "/upload", VALID_PNG, content_type="image/png")
    return answer["imageUrl"].rsplit("/", 1)[1]


def _call(
    address: tuple[str, int],
    method: str,
    path: str,
    body: object = None,
    *,
    content_type: str = "application/json",
) -> dict[str, str]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if payload else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data: dict[str, str] = json.loads(response.read())
        return data
    finally:
        connection.close()
