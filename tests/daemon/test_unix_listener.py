"""listen = unix:/path: the daemon on a real AF_UNIX stream socket, and its socket file."""

from __future__ import annotations

import multiprocessing
import os
import socket
import stat
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from bench.load import subscriber_worker
from daemon.api.clients import client_address, parse_networks
from daemon.config import ConfigError, load
from daemon.http.client import ClientResponse
from daemon.http.types import Headers
from daemon.http.unix_listener import UnixListenError, open_unix_listener
from daemon.simulator import SimulatorConfig
from tests.daemon.harness import Daemon, running_daemon
from tests.ops.harness import short_directory

HELD = SimulatorConfig(step_time=0.01, manual_steps=True)  # prompts wait for grant_steps()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory: a socket path has at most 107 bytes, pytest's tmp_path can be longer."""
    with short_directory() as path:
        yield path


def dead_socket_file(path: Path) -> None:
    """What a daemon killed with -9 leaves: the file, and nothing listening on it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen(1)


def live_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


# ---------------------------------------------------------------- serving


async def test_a_daemon_on_a_unix_socket_serves_a_generation_to_complete(
    tmp_path: Path, socket_dir: Path
) -> None:
    path = socket_dir / "http.sock"
    async with running_daemon(tmp_path, listen=f"unix:{path}") as daemon:
        assert daemon.bound.url == f"unix:{path}"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        task_id = await daemon.generate()
        events = await daemon.events(task_id)
    assert [e.event for e in events][-1] == "complete", events
    assert not path.exists()  # removed when the daemon stopped


async def test_a_stale_socket_file_is_replaced(tmp_path: Path, socket_dir: Path) -> None:
    path = socket_dir / "http.sock"
    dead_socket_file(path)
    async with running_daemon(tmp_path, listen=f"unix:{path}") as daemon:
        health = await daemon.request("GET", "/healthz")
    assert health.status == 200, health.body


async def test_a_socket_file_replaced_meanwhile_is_not_removed(
    tmp_path: Path, socket_dir: Path
) -> None:
    path = socket_dir / "http.sock"
    async with running_daemon(tmp_path, listen=f"unix:{path}"):
        # A newer daemon took the path over (unlinked ours, bound its own).
        path.unlink()
        newer = live_socket(path)
    with newer, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))  # the newer daemon's socket is still there


async def test_a_newer_socket_on_our_freed_inode_is_not_removed(socket_dir: Path) -> None:
    path = socket_dir / "http.sock"
    listener, socket_file = open_unix_listener(path, 0o666)
    await listener.aclose()
    # A newer daemon found our file stale and replaced it: its file often gets
    # the inode number ours just freed.
    path.unlink()
    with live_socket(path):
        socket_file.remove_if_ours()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still there: connect would fail with ENOENT


def test_a_live_socket_is_refused(socket_dir: Path) -> None:
    path = socket_dir / "http.sock"
    with live_socket(path):
        with pytest.raises(UnixListenError, match=r"already in use \(another daemon answers"):
            open_unix_listener(path, 0o666)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # still the other daemon's


def test_a_file_that_is_not_a_socket_is_refused_and_left_intact(socket_dir: Path) -> None:
    path = socket_dir / "http.sock"
    path.write_text("precious")
    with pytest.raises(UnixListenError, match="is not a socket"):
        open_unix_listener(path, 0o666)
    assert path.read_text() == "precious"


def test_the_directory_must_exist(socket_dir: Path) -> None:
    path = socket_dir / "missing" / "http.sock"
    with pytest.raises(UnixListenError, match="does not exist"):
        open_unix_listener(path, 0o666)
    assert not path.parent.exists()  # not made for us


@pytest.mark.parametrize("mode", [0o666, 0o660, 0o600], ids=oct)
async def test_the_mode_is_applied_whatever_the_umask(socket_dir: Path, mode: int) -> None:
    path = socket_dir / "http.sock"
    old = os.umask(0o077)  # the unit's UMask=
    try:
        listener, socket_file = open_unix_listener(path, mode)
    finally:
        os.umask(old)
    async with listener:
        assert stat.S_IMODE(os.lstat(path).st_mode) == mode
    socket_file.remove_if_ours()
    assert not path.exists()


async def test_the_benchmark_load_client_holds_streams_over_the_unix_socket(
    tmp_path: Path, socket_dir: Path
) -> None:
    path = socket_dir / "http.sock"
    async with running_daemon(tmp_path, listen=f"unix:{path}") as daemon:
        task_id = await daemon.generate()
        parent, child = multiprocessing.Pipe()
        with parent, child:
            async with trio.open_nursery() as nursery:
                subscriptions = [(task_id, 1), (task_id, 2)]
                worker = partial(subscriber_worker, child, str(path), subscriptions)
                nursery.start_soon(trio.to_thread.run_sync, worker)
                assert (await trio.to_thread.run_sync(parent.recv, abandon_on_cancel=True))[
                    0
                ] == "ready"
                parent.send(("go",))
                done = await trio.to_thread.run_sync(parent.recv, abandon_on_cancel=True)
    assert done[0] == "done"
    assert [terminal for _task, _events, terminal, _at, _count in done[3]] == ["complete"] * 2


# ---------------------------------------------------------------- who the client is


async def post(daemon: Daemon, client: str) -> ClientResponse:
    return await daemon.request(
        "POST", "/generate", {"prompt": "a red fox"}, headers=(("X-Forwarded-For", client),)
    )


async def statuses_behind(
    tmp_path: Path, socket_dir: Path, trusted_proxies: str, clients: list[str]
) -> list[int]:
    """POST /generate over the Unix socket once per X-Forwarded-For client, with one
    unfinished task allowed per client: the statuses."""
    async with running_daemon(
        tmp_path,
        simulator=HELD,
        listen=f"unix:{socket_dir / 'http.sock'}",
        max_queued_tasks_per_client=1,
        trusted_proxies=trusted_proxies,
    ) as daemon:
        return [(await post(daemon, client)).status for client in clients]


async def test_trusted_proxies_unix_names_the_client_from_x_forwarded_for(
    tmp_path: Path, socket_dir: Path
) -> None:
    # The second client is another one behind the proxy.
    clients = ["203.0.113.1", "203.0.113.1", "203.0.113.2"]
    assert await statuses_behind(tmp_path, socket_dir, "unix", clients) == [202, 429, 202]


async def test_without_it_every_unix_peer_is_one_client(tmp_path: Path, socket_dir: Path) -> None:
    clients = ["203.0.113.1", "203.0.113.2"]  # the header is ignored
    assert await statuses_behind(tmp_path, socket_dir, "127.0.0.1", clients) == [202, 429]


def test_client_address_of_a_unix_peer() -> None:
    forwarded = Headers([("x-forwarded-for", "203.0.113.1")])
    assert client_address(forwarded, "unix", parse_networks("unix")) == "203.0.113.1"
    assert client_address(forwarded, "unix", parse_networks("127.0.0.1, ::1")) == "unix"
    # `unix` trusts the socket's peer, not a TCP peer.
    assert client_address(forwarded, "127.0.0.1:5000", parse_networks("unix")) == "127.0.0.1"


# ---------------------------------------------------------------- configuration


def settings(**flags: str) -> None:
    load(config_file=None, environ={}, flags=flags)


def test_listen_takes_an_absolute_unix_path_and_a_mode() -> None:
    config = load(
        config_file=None,
        environ={},
        flags={"listen": "unix:/run/comfy-progress/http.sock", "listen_mode": "0660"},
    )
    assert config.listen_unix_path == Path("/run/comfy-progress/http.sock")
    assert config.listen_socket_mode == 0o660
    assert load(config_file=None, environ={}, flags={}).listen_socket_mode == 0o666
    assert load(config_file=None, environ={}, flags={}).listen_unix_path is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"listen": "unix:"}, "names no path"),
        ({"listen": "unix:run/http.sock"}, "must be absolute"),
        ({"listen": "unix:/" + "x" * 120}, "at most 107 bytes"),
        ({"listen": "/run/http.sock"}, "not HOST:PORT"),
        ({"listen_mode": "0999"}, "not an octal mode"),
        ({"listen_mode": "rw-rw-rw-"}, "not an octal mode"),
        ({"trusted_proxies": "unix, nginx"}, "nginx"),
    ],
)
def test_bad_unix_settings_are_config_errors(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(**flags)


async def test_the_daemon_stops_with_the_clear_error_when_the_path_is_in_use(
    tmp_path: Path, socket_dir: Path
) -> None:
    path = socket_dir / "http.sock"
    with (
        live_socket(path),
        pytest.RaisesGroup(
            pytest.RaisesExc(UnixListenError, match=r"already in use \(another daemon answers"),
            flatten_subgroups=True,
        ),
    ):
        async with running_daemon(tmp_path, listen=f"unix:{path}"):
            raise AssertionError("started on a path in use")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
