"""The real daemon with its embedded ComfyUI simulator, in a subprocess.

Started exactly as a user would (`python -m daemon.cli serve --simulate`) on
127.0.0.1 port 0; the bound URLs come from its log line
`listening on http://127.0.0.1:PORT (ComfyUI at http://127.0.0.1:PORT)`.
Stopped with SIGTERM (the daemon drains), then SIGKILL if it lingers.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.web.browser import REPO_ROOT

LISTENING = re.compile(r"listening on (http://[^\s\"]+) \(ComfyUI at (http://[^\s\")]+)\)")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class DaemonDidNotStart(RuntimeError):
    pass


@dataclass
class DaemonProcess:
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    url: str = ""  # the daemon, e.g. http://127.0.0.1:40123
    comfy_url: str = ""  # its embedded simulator
    _started: threading.Event = field(default_factory=threading.Event)
    _line_read: threading.Condition = field(default_factory=threading.Condition)

    def _read_output(self) -> None:
        # Drain the pipe for the whole run so the daemon never blocks on a full pipe.
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._line_read:
                self.output.append(line.rstrip("\n"))
                self._line_read.notify_all()
            match = LISTENING.search(line)
            if match and not self._started.is_set():
                self.url, self.comfy_url = match.group(1), match.group(2)
                self._started.set()
        self._started.set()  # the process ended: stop waiting

    def request(self, method: str, url: str, body: object = None) -> tuple[int, Any]:
        """One JSON request; returns (status, decoded body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def sim_control(self, **knobs: object) -> None:
        """Turn the simulator's fault knobs (POST /sim/control)."""
        status, body = self.request("POST", f"{self.comfy_url}/sim/control", knobs)
        assert status == 200, body

    def log(self) -> str:
        return "\n".join(self.output[-60:])

    def wait_for_output(self, wanted: Callable[[str], bool], timeout: float = 10.0) -> bool:
        """Until a line of output for which `wanted` holds has been read: the daemon
        may have written it before an answer this test already holds, and this
        side reads the pipe in its own thread."""
        with self._line_read:
            return self._line_read.wait_for(lambda: any(map(wanted, self.output)), timeout)


@contextmanager
def running_daemon(data_dir: Path, *settings: str) -> Iterator[DaemonProcess]:
    """`settings` are KEY=VALUE config settings, passed as --set."""
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
        "--log-level",
        "info",
        *(arg for setting in settings for arg in ("--set", setting)),
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    daemon = DaemonProcess(process)
    reader = threading.Thread(target=daemon._read_output, name="daemon-output", daemon=True)
    reader.start()
    try:
        if not daemon._started.wait(START_TIMEOUT) or not daemon.url:
            raise DaemonDidNotStart(f"no 'listening on' line; output:\n{daemon.log()}")
        yield daemon
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()
