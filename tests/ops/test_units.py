"""The shipped unit files: `systemd-analyze verify` passes, and they agree with the rest.

`systemd-analyze verify` needs no running systemd, but it loads the units the
way the manager would: every dependency (sysinit.target, sockets.target, ...)
must resolve and ExecStart= must name an executable file. So the test lays
out a root directory as the README installs the service: the units in
/etc/systemd/system, the console script `make setup` creates at
/opt/comfy-progress/.venv/bin/comfy-progress (a copy of this checkout's), and
the host's own /usr/lib/systemd/system units, then runs
`systemd-analyze verify --root=ROOT`. Warnings (an unknown or misspelt key)
fail the test too: verify prints them but still exits 0.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from daemon import config as config_module
from tests.ops.harness import SITE_FILE, SYSTEMD_DIR

UNITS = ("comfy-progress.service", "comfy-progress.socket", "comfy-progress-worker.service")
INSTALL_DIR = Path("/opt/comfy-progress")
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def parse_unit(path: Path) -> dict[str, list[str]]:
    """'Section.Key' -> every value assigned to it, in order (systemd.syntax(7), simplified)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def one(unit: dict[str, list[str]], key: str) -> str:
    assert len(unit.get(key, [])) == 1, f"{key}: {unit.get(key)}"
    return unit[key][0]


SERVICE = parse_unit(SYSTEMD_DIR / "comfy-progress.service")
SOCKET = parse_unit(SYSTEMD_DIR / "comfy-progress.socket")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is missing (Debian package systemd; .ci/run installs it)"
    return found


def install_root(tmp_path: Path) -> Path:
    """A filesystem root with the service installed as the README says."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD_DIR / name, units / name)
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    assert host_units, f"no systemd unit directory among {HOST_UNIT_DIRS}"
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    exec_start = Path(one(SERVICE, "Service.ExecStart").split()[0])
    console_script = Path(sys.executable).parent / exec_start.name
    assert console_script.exists(), f"{console_script}: run the tests from `make setup`'s venv"
    target = root / exec_start.relative_to("/")
    target.parent.mkdir(parents=True)
    shutil.copy2(console_script, target)
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", f"--root={root}", *UNITS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_systemd_analyze_verify_passes_on_both_units(tmp_path: Path) -> None:
    root = install_root(tmp_path)
    result = verify(root)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", "warnings:\n" + result.stderr

    # The check has teeth: verify does read the installed files.
    service = root / "etc/systemd/system/comfy-progress.service"
    service.write_text(service.read_text().replace("ProtectSystem=", "ProtectSystm="))
    broken = verify(root)
    assert "ProtectSystm" in broken.stderr, broken


def test_the_service_is_type_notify_with_a_watchdog_and_the_socket() -> None:
    assert one(SERVICE, "Service.Type") == "notify"
    assert one(SERVICE, "Service.NotifyAccess") == "main"
    assert one(SERVICE, "Service.WatchdogSec") == "30s"
    assert one(SERVICE, "Service.Restart") == "on-failure"
    assert one(SERVICE, "Unit.Requires") == "comfy-progress.socket"
    assert "comfy-progress.socket" in one(SERVICE, "Unit.After").split()
    assert one(SOCKET, "Socket.Service") == "comfy-progress.service"
    assert one(SOCKET, "Socket.Accept") == "no"  # one daemon, LISTEN_FDS, not inetd-style
    exec_start = one(SERVICE, "Service.ExecStart").split()
    assert exec_start == [str(INSTALL_DIR / ".venv/bin/comfy-progress"), "serve"]


def test_the_service_is_hardened() -> None:
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "comfy-progress",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
    }
    assert {key: one(SERVICE, f"Service.{key}") for key in expected} == expected
    assert int(one(SERVICE, "Service.LimitNOFILE")) >= 65536


def unit_environment() -> dict[str, str]:
    """The service's Environment= lines, with the %S specifier of a system unit."""
    env = dict(item.split("=", 1) for item in SERVICE["Service.Environment"])
    return {key: value.replace("%S", "/var/lib") for key, value in env.items()}


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s?)", value)
    assert match, f"only plain seconds are parsed here: {value!r}"
    return float(match.group(1))


def test_the_shipped_config_loads_with_the_units_environment() -> None:
    env = unit_environment()
    assert env["COMFY_PROGRESS_CONFIG"] == "/etc/comfy-progress/config.toml"
    # The data directory is the StateDirectory, the only place it may write.
    state_dir = f"/var/lib/{one(SERVICE, 'Service.StateDirectory')}"
    assert env["COMFY_PROGRESS_DATA_DIR"] == state_dir
    # The shipped example as /etc/comfy-progress/config.toml: it loads, and
    # the unit's data directory wins over anything in it.
    environ = {**env, "COMFY_PROGRESS_CONFIG": str(SYSTEMD_DIR / "config.toml")}
    config = config_module.load(config_file=None, environ=environ, flags={})
    assert config.data_dir == Path(state_dir)
    assert config.comfy_url == "http://127.0.0.1:8188"
    # systemd waits TimeoutStopSec for the drain (shutdown_grace) to finish.
    assert seconds(one(SERVICE, "Service.TimeoutStopSec")) > config.shutdown_grace + 5


def test_the_socket_nginx_and_heartbeat_agree() -> None:
    listen = one(SOCKET, "Socket.ListenStream")
    site = SITE_FILE.read_text()
    upstream = re.search(r"upstream comfy_progress \{[^}]*?\bserver\s+(\S+);", site)
    assert upstream, "the site file has no upstream server"
    assert upstream.group(1) == listen, "nginx must proxy to the socket unit's address"
    read_timeout = re.search(r"^\s*proxy_read_timeout\s+(\S+);", site, re.MULTILINE)
    assert read_timeout
    # A quiet SSE stream survives nginx only if heartbeats come well within it.
    heartbeat = config_module.Config().heartbeat_interval
    assert seconds(read_timeout.group(1)) >= 2 * heartbeat
    # nginx must not reuse an idle upstream connection the daemon is closing.
    keepalive = re.search(r"^\s*keepalive_timeout\s+(\S+);", site, re.MULTILINE)
    assert keepalive
    assert seconds(keepalive.group(1)) < config_module.Config().keep_alive_timeout
