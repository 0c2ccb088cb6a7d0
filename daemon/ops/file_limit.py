"""Fit `max_connections` to the process's open-file limit (RLIMIT_NOFILE).

Every client connection is a file descriptor. When the limit is lower than
`max_connections`, accept() fails with EMFILE long before the connection limit
is reached, and clients wait in the kernel's backlog instead of getting a 503.
So at start the soft limit is raised to the hard one (any process may do
that), and `max_connections` is lowered, with a warning, when it still does
not fit.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Descriptors the daemon needs besides its client connections: the journal
# (database and WAL), images being read or written for requests in flight,
# sockets to ComfyUI, the listeners, Trio's own wake-up pipe and epoll, stdio.
RESERVED_FILES = 128


def raise_soft_limit() -> int:
    """Raise the soft open-file limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def connections_that_fit(max_connections: int, open_files: int) -> int:
    """`max_connections`, lowered so that it leaves RESERVED_FILES descriptors free (at least 1)."""
    return max(1, min(max_connections, open_files - RESERVED_FILES))


def fit_max_connections(max_connections: int) -> int:
    """Raise the soft limit, then the connection limit that fits it (warning when lowered)."""
    open_files = raise_soft_limit()
    fitted = connections_that_fit(max_connections, open_files)
    if fitted < max_connections:
        log.warning(
            "max_connections %d does not fit the open-file limit %d (RLIMIT_NOFILE, %d kept "
            "for the daemon's own files); serving at most %d connections; raise the limit "
            "(systemd: LimitNOFILE=) to allow more",
            max_connections,
            open_files,
            RESERVED_FILES,
            fitted,
        )
    return fitted
