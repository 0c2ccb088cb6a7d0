"""`comfy-progress serve | simulate-comfy | generate`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from daemon import config as config_module
from daemon.ops.file_limit import fit_max_connections
from daemon.ops.logs import setup_logging
from daemon.terminal import command as terminal_command
from daemon.terminal.client import TOKEN_VARIABLE


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to bind, or unix:/absolute/path")
    p.add_argument(
        "--comfy-url",
        metavar="URL",
        action="append",
        help="ComfyUI base URL, e.g. http://127.0.0.1:8188; repeat it for a pool of backends",
    )
    p.add_argument(
        "--simulate",
        metavar="N",
        nargs="?",
        type=int,
        const=1,
        default=None,
        help="use N embedded ComfyUI simulators (default 1; the default when no URL is set)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="images, journal and client ids live here")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting (see --print-config), e.g. --set heartbeat_interval=15",
    )
    p.add_argument("--print-config", action="store_true", help="print the effective configuration")


def _simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate-comfy", help="run only the ComfyUI simulator")
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8188")
    p.add_argument("--step-time", type=float, default=0.15, help="seconds per sampler step")
    p.add_argument(
        "--hide-node",
        action="append",
        default=[],
        metavar="CLASS",
        help="a node class this simulator does not have (repeatable)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-progress", description="Live ComfyUI progress for browsers, over SSE."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _simulate_parser(sub)
    terminal_command.add_parser(sub)
    return parser


# Settings a `serve` flag sets beside its own (see _flag_settings).
_ALSO_SET_BY: Final = {"comfy_urls": "comfy_url", "simulators": "simulate"}


def _flag_settings(args: argparse.Namespace) -> dict[str, str]:
    flags: dict[str, str] = {}
    for key, value in (
        ("listen", args.listen),
        ("data_dir", args.data_dir),
        ("log_level", args.log_level),
    ):
        if value is not None:
            flags[key] = value
    if args.comfy_url:
        # Flags replace the lower layers' URLs as a whole.
        flags["comfy_url"] = args.comfy_url[0]
        flags["comfy_urls"] = ",".join(args.comfy_url[1:])
    if args.simulate is not None:
        flags["simulate"] = "true"
        flags["simulators"] = str(args.simulate)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise config_module.ConfigError(f"--set {item!r}: expected KEY=VALUE")
        flags[key.strip().replace("-", "_")] = value
    return flags


def _flag_names(args: argparse.Namespace) -> dict[str, str]:
    """Setting -> the `serve` flag that set it, so that a configuration error names
    what was typed; less the settings --set gave (it comes last and wins)."""
    from daemon.ops.reference import serve_flags  # (it reads this module's parser)

    own = serve_flags()
    own.update({name: own[flag_of] for name, flag_of in _ALSO_SET_BY.items()})
    by_set = {item.partition("=")[0].strip().replace("-", "_") for item in args.set}
    return {name: flag for name, flag in own.items() if name not in by_set}


def serve(args: argparse.Namespace) -> int:
    from daemon.app import App, serve_until_signalled
    from daemon.ops.gc_tuning import tune_gc
    from daemon.ops.systemd import SocketActivationError, Systemd
    from daemon.workflow_files import WorkflowFileError

    try:
        config = config_module.load_from_process(
            args.config, _flag_settings(args), _flag_names(args)
        )
    except config_module.ConfigError as exc:
        print(f"comfy-progress: configuration error: {exc}", file=sys.stderr)
        return 2
    if not config.backend_urls and not config.simulate and not config.shared:
        # No ComfyUI given: the embedded simulator is the documented default
        # (with redis_url a daemon has only the backends it is given).
        config = config_module.Config(**{**config.as_dict(), "simulate": True})
    if args.print_config:
        print(config_module.render_toml(config), end="")
        return 0
    setup_logging(config.log_level)
    if os.environ.get(TOKEN_VARIABLE) and not config.api_tokens:
        logging.getLogger("daemon").warning(
            "%s is the terminal client's token, not a setting: this daemon needs none"
            " (its tokens are api_tokens, %sAPI_TOKENS)",
            TOKEN_VARIABLE,
            config_module.ENV_PREFIX,
        )
    fitted = fit_max_connections(config.max_connections)
    if fitted != config.max_connections:
        config = config_module.Config(**{**config.as_dict(), "max_connections": fitted})
    try:
        # LISTEN_* leave the environment here, before the app starts anything.
        systemd = Systemd.from_environ()
    except SocketActivationError as exc:
        print(f"comfy-progress: socket activation: {exc}", file=sys.stderr)
        return 2
    try:
        app = App(config, systemd=systemd)
    except WorkflowFileError as exc:
        systemd.close()
        print(f"comfy-progress: workflow error: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    status = 0
    try:
        trio.run(serve_until_signalled, app)
    except* OSError as group:
        # A data directory that cannot be made, an address in use: one clear
        # log line (the traceback rides along in its error= field), exit 1.
        for error in _leaves(group):
            logging.getLogger("daemon").error("the daemon stopped: %s", error, exc_info=error)
        status = 1
    finally:
        systemd.close()
    return status


def _leaves(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    found: list[OSError] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def simulate(args: argparse.Namespace) -> int:
    from daemon.simulator import SimulatorConfig, run_simulator

    setup_logging(args.log_level)
    try:
        host, port = config_module.split_host_port(args.listen)
    except config_module.ConfigError as exc:
        print(f"comfy-progress: {exc}", file=sys.stderr)
        return 2
    config = SimulatorConfig(step_time=args.step_time, hidden_nodes=tuple(args.hide_node))
    trio.run(run_simulator, host, port, config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "simulate-comfy":
            return simulate(args)
        if args.command == "generate":
            return terminal_command.generate(args)
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
