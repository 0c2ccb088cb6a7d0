"""Exec a command as systemd execs a service's main process.

    python -m tests.ops.service_exec [--pid-env NAME ...] [FD[=FDNAME] ...] -- COMMAND [ARG ...]

systemd forks, then, in the child, moves the socket unit's fds to 3, 4, ...
and sets LISTEN_FDS (their count), LISTEN_FDNAMES (their names, ":"-joined)
and LISTEN_PID (the child's own pid), plus WATCHDOG_PID, before exec(). A
test cannot know the child's pid before the fork, so this small program does
that step: it moves the listed inherited fds into place, sets LISTEN_* when
there are fds and every `--pid-env NAME` to its own pid, and execs COMMAND,
which keeps that pid.
"""

from __future__ import annotations

import fcntl
import os
import sys

SD_LISTEN_FDS_START = 3
PARKING = 100  # fds are parked at or above this while they move to 3, 4, ...


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    if not command:
        sys.exit(__doc__)
    pid_variables: list[str] = []
    fds: list[int] = []
    names: list[str] = []
    items = iter(options)
    for item in items:
        if item == "--pid-env":
            pid_variables.append(next(items))
            continue
        number, _, name = item.partition("=")
        fds.append(int(number))
        names.append(name or "unknown")
    # Park every fd high first, so moving one to 3 + i cannot clobber another.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, PARKING) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, high in enumerate(parked):
        os.dup2(high, SD_LISTEN_FDS_START + index)  # inheritable, like systemd's
        os.close(high)
    pid = str(os.getpid())
    if fds:
        os.environ["LISTEN_FDS"] = str(len(fds))
        os.environ["LISTEN_FDNAMES"] = ":".join(names)
        os.environ["LISTEN_PID"] = pid
    for name in pid_variables:
        os.environ[name] = pid
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
