"""daemon/ops/systemd.py in-process: reading systemd's variables, sending over a real socket.

The daemon as systemd runs it (a real process, READY/WATCHDOG/STOPPING, fd 3)
is tested in tests/ops/; these are the edge cases of the pieces.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from daemon.ops.systemd import (
    SocketActivationError,
    Systemd,
    notify_address,
    take_listen_fds,
    watchdog_interval,
)

PID = 4242


def test_no_listen_variables_means_bind_yourself() -> None:
    assert take_listen_fds({}, PID) == []


def test_listen_fds_for_another_process_are_ignored_and_removed() -> None:
    environ = {"LISTEN_PID": str(PID + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "X": "1"}
    assert take_listen_fds(environ, PID) == []
    assert environ == {"X": "1"}  # no child of ours inherits them


def test_malformed_listen_variables_are_an_error_and_still_removed() -> None:
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "one"}
    with pytest.raises(SocketActivationError, match="must be numbers"):
        take_listen_fds(environ, PID)
    assert environ == {}


def test_zero_listen_fds_means_bind_yourself() -> None:
    assert take_listen_fds({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, PID) == []


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID + 1)}, None),
    ],
)
def test_watchdog_pings_at_half_the_timeout_only_for_our_pid(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, PID) == expected


def test_notify_addresses() -> None:
    assert (
        notify_address("@/org/freedesktop/systemd1/notify") == "\0/org/freedesktop/systemd1/notify"
    )
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("vsock:2:1234") is None


def test_from_environ_without_systemd_is_inert() -> None:
    systemd = Systemd.from_environ({}, pid=PID)
    assert not systemd.enabled
    assert systemd.watchdog_interval is None
    assert systemd.listeners() == []


async def test_without_notify_socket_every_call_is_a_no_op() -> None:
    systemd = Systemd()
    await systemd.notify("READY=1")
    await systemd.notify_stopping("draining")
    assert systemd.sent == 0


async def test_messages_go_to_a_path_socket_in_order(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        systemd = Systemd(notify_socket=str(tmp_path / "notify"), watchdog_interval=1.0)
        await systemd.notify("READY=1", "STATUS=up")
        await systemd.notify("WATCHDOG=1")
        await systemd.notify_stopping("draining 2 SSE streams")
        received = [receiver.recv(4096) for _ in range(3)]
    assert received == [
        b"READY=1\nSTATUS=up",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=stopping: draining 2 SSE streams",
    ]
    assert systemd.sent == 3


async def test_a_failed_send_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    systemd = Systemd(notify_socket=str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="daemon.ops.systemd"):
        for _ in range(3):
            await systemd.notify("WATCHDOG=1")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()
    assert systemd.sent == 0
