"""Listening on a Unix domain stream socket (`listen = "unix:/path"`), and cleaning up after.

A reverse proxy on the same host reaches the daemon without loopback TCP: a
write to an AF_UNIX stream costs the writer less CPU than a loopback TCP write
(whose system call also runs the receiving end of the TCP stack), and SSE
fan-out is one write per subscriber per event.

Binding never guesses: the directory must exist (systemd's RuntimeDirectory=
makes it); a socket file left by a crashed daemon (connecting is refused) is
replaced, one a live daemon answers on is an error, and anything that is not a
socket is an error and left alone. At shutdown the file is removed only if it
is still the one we bound, so a newer daemon's socket is never removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# The kernel caps it at net.core.somaxconn, as trio's own listeners do.
_BACKLOG = 0xFFFF


class UnixListenError(OSError):
    """The socket path cannot be listened on; the message says why (the CLI exits 1)."""


class SocketFile:
    """The socket file we bound: removed at the end only while it is still ours.

    An O_PATH descriptor holds our inode: compared with the path's, it tells
    ours from a newer daemon's file, and as long as it is open the file system
    cannot give our inode number to that newer file (it would, once freed).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)

    def remove_if_ours(self) -> None:
        if self._fd is None:
            return
        try:
            if not os.path.samestat(os.lstat(self.path), os.fstat(self._fd)):
                log.info("%s is another process's socket now: left in place", self.path)
                return
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the socket file %s: %s", self.path, exc.strerror)
        finally:
            os.close(self._fd)
            self._fd = None


def open_unix_listener(path: Path, mode: int) -> tuple[trio.SocketListener, SocketFile]:
    """Bind and listen on `path` with permission bits `mode`; raises UnixListenError."""
    if not path.parent.is_dir():
        raise UnixListenError(
            f"cannot listen on {path}: the directory {path.parent} does not exist"
            " (create it, or let systemd's RuntimeDirectory= make it)"
        )
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(path))
        except OSError as exc:
            raise UnixListenError(f"cannot listen on {path}: {exc.strerror}") from None
        socket_file = SocketFile(path)  # at once: our inode, held from now on
        try:
            # Before listen(): until then every connect is refused, so the
            # umask's bits are never the ones that count.
            os.chmod(path, mode)
            sock.listen(_BACKLOG)
        except OSError:
            socket_file.remove_if_ours()
            raise
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), socket_file


def _clear_stale(path: Path) -> None:
    """Unlink a dead daemon's socket at `path`; refuse a live one or a file that is no socket."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnixListenError(f"cannot listen on {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(found.st_mode):
        raise UnixListenError(
            f"cannot listen on {path}: it exists and is not a socket (left as is)"
        )
    answer = _probe(path)
    if answer == errno.ENOENT:  # gone meanwhile
        return
    if answer == errno.ECONNREFUSED:
        log.info("removing the stale socket file %s (nothing listens on it)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    if answer in (0, errno.EAGAIN):  # EAGAIN: it listens, its backlog is full
        raise UnixListenError(
            f"cannot listen on {path}: already in use (another daemon answers on it)"
        )
    raise UnixListenError(f"cannot listen on {path}: connecting to it fails: {os.strerror(answer)}")


def _probe(path: Path) -> int:
    """0 if something accepts connections at `path`, else the errno of the attempt."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Non-blocking: a local connect finishes at once or fails with EAGAIN.
        probe.setblocking(False)
        return probe.connect_ex(str(path))
